"""The core service's first check: is there a cgroup hierarchy to put instances in?

Fake roots in tmp_path: a fresh sysfs's /sys/fs/cgroup (empty), cgroup v1 with some of its
controllers, cgroup v2 with or without cpu and memory.
"""

from zfast.core.cgroups import hierarchy_problem


def _v1(root, controllers):
    for c in controllers:
        (root / c).mkdir()
        (root / c / "cgroup.procs").write_text("1\n")


def test_an_empty_cgroup_directory_says_where_and_what_to_do(tmp_path):
    problem = hierarchy_problem(tmp_path)
    assert problem.startswith(f"no cgroup hierarchy at {tmp_path} ")
    assert "ip netns exec" in problem and "nsenter --net=/var/run/netns/" in problem
    assert "\n" not in problem


def test_cgroup_v1_with_cpu_cpuacct_and_memory_is_enough(tmp_path):
    _v1(tmp_path, ["cpu", "cpuacct", "memory", "pids"])
    assert hierarchy_problem(tmp_path) is None


def test_cgroup_v1_without_a_controller_names_it(tmp_path):
    _v1(tmp_path, ["cpu", "cpuacct"])
    (tmp_path / "memory").mkdir()            # a directory, nothing mounted on it
    assert hierarchy_problem(tmp_path) == f"no memory cgroup controller at {tmp_path} " \
                                          "(cgroup v1 mounts it there)"


def test_cgroup_v1_comounted_cpu_and_cpuacct(tmp_path):
    _v1(tmp_path, ["cpu,cpuacct", "memory"])
    (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    (tmp_path / "cpuacct").symlink_to("cpu,cpuacct")
    assert hierarchy_problem(tmp_path) is None


def test_cgroup_v2_needs_cpu_and_memory(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert hierarchy_problem(tmp_path) is None
    (tmp_path / "cgroup.controllers").write_text("cpuset io pids\n")
    assert hierarchy_problem(tmp_path) == f"cgroup v2 at {tmp_path} offers no cpu and no memory controller"
