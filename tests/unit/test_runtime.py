"""The instance runtime's account of why a daemon exited (its last words in daemon.log)."""

from zfast.core.runtime import Instance, InstanceSpec, NetnsRuntime


def _instance(tmp_path) -> Instance:
    spec = InstanceSpec(name="lb-a", kind="balancer", links=[], cpu=0.5, memory=1 << 28,
                        state_dir=tmp_path)
    return Instance(spec=spec, netns="zfc-test-lb-a", cgroup=None)


def test_last_words_are_the_daemons_last_line_since_its_start(tmp_path):
    log = tmp_path / "daemon.log"
    log.write_text("zfast: error: an earlier daemon's refusal\n")
    inst = _instance(tmp_path)
    inst.log_from = log.stat().st_size             # where this daemon's output begins
    runtime = NetnsRuntime("test")
    assert runtime.last_words(inst) == ""          # it said nothing yet: not its predecessor's words
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\n  File \"x\", line 1\n"
                "OSError: [Errno 22] Invalid argument\n\n")
    assert runtime.last_words(inst) == "OSError: [Errno 22] Invalid argument"


def test_last_words_are_bounded_and_survive_a_missing_log(tmp_path):
    inst = _instance(tmp_path)
    runtime = NetnsRuntime("test")
    assert runtime.last_words(inst) == ""
    (tmp_path / "daemon.log").write_text("x" * 10000 + "\n")
    assert runtime.last_words(inst) == "x" * 300
