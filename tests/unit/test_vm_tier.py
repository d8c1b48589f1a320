"""The VM tier's pure parts: which kernel, KVM or emulation, vng's command line, pytest's
summary, the traffic verdict, and what native XDP on virtio-net needs."""

from pathlib import Path

import pytest

from tests.bpf import conftest as bpf_conftest
from zfast.dataplane import loader, virtio
from zfast.lab import vm, vmnet, vmsetup


def test_the_guest_kernel_is_the_generic_flavour_of_the_newest_cloud_headers():
    dirs = ["/usr/src/linux-headers-6.1.0-9-cloud-amd64",
            "/usr/src/linux-headers-6.1.0-57-cloud-amd64",
            "/usr/src/linux-headers-6.1.0-57-common"]
    assert vmsetup.generic_release(dirs) == "6.1.0-57-amd64"
    assert vmsetup.kernel_packages("6.1.0-57-amd64") == [
        "linux-image-6.1.0-57-amd64", "linux-headers-6.1.0-57-amd64"]
    with pytest.raises(vmsetup.SetupError, match="cloud"):
        vmsetup.generic_release(["/usr/src/linux-headers-6.1.0-57-common"])


def test_kvm_when_a_probe_boot_ran_else_tcg_saying_why():
    assert vm.decide_accel("auto", True, (0, 3.2, "")).name == "kvm"
    hung = vm.decide_accel("auto", True, (None, 60.0, ""))
    assert hung.name == "tcg" and "within 60 s" in hung.why
    failed = vm.decide_accel("auto", True, (255, 0.4, "failed to set MSR 0x10a"))
    assert failed.name == "tcg" and "MSR 0x10a" in failed.why
    assert vm.decide_accel("auto", False, None) == vm.Accel("tcg", "no /dev/kvm")
    assert vm.decide_accel("tcg", True, None).name == "tcg"
    assert vm.decide_accel("kvm", True, None).name == "kvm"
    with pytest.raises(SystemExit, match="did not finish booting"):
        vm.decide_accel("kvm", True, (None, 60.0, ""))
    with pytest.raises(SystemExit, match="/dev/kvm"):
        vm.decide_accel("kvm", False, None)


def test_vng_command_line():
    argv = vm.vng_argv(Path("/v/bin/vng"), Path("/boot/vmlinuz-6.1.0-57-amd64"), "tcg", "python x",
                       rwdirs=(Path("/var/cache/zfast-vm"), Path("/run/zfvm-1")),
                       qemu_opts=("-netdev", "tap,id=pub"), cwd=Path("/work/r"))
    assert argv[:6] == ["/v/bin/vng", "--run", "/boot/vmlinuz-6.1.0-57-amd64", "--cpus", "2",
                        "--memory"]
    assert "--disable-kvm" in argv
    assert "--rwdir=/var/cache/zfast-vm" in argv and "--rwdir=/run/zfvm-1" in argv
    assert "--qemu-opts=-netdev tap,id=pub" in argv
    assert argv[-2:] == ["--exec", "python x"]
    assert argv[argv.index("--cwd") + 1] == "/work/r"
    kvm = vm.vng_argv(Path("vng"), Path("k"), "kvm", "true", cpus=1, memory="1G")
    assert "--disable-kvm" not in kvm and kvm[kvm.index("--cpus") + 1] == "1"
    with pytest.raises(ValueError):
        vm.vng_argv(Path("vng"), Path("k"), "hvf", "true")


def test_two_nics_on_the_wire_namespace_taps():
    one = vmnet.nic_opts()
    assert one.count("-netdev") == 2 and one.count("-device") == 2
    assert f"virtio-net-pci,netdev=pub,mac={vmnet.PUB_MAC}" in one
    assert "tap,id=priv,ifname=tpriv,script=no,downscript=no" in one
    four = vmnet.nic_opts(queues=4)
    assert "tap,id=pub,ifname=tpub,script=no,downscript=no,queues=4" in four
    assert f"virtio-net-pci,netdev=pub,mac={vmnet.PUB_MAC},mq=on,vectors=10" in four


@pytest.mark.parametrize("line, counts", [
    ("415 passed, 26 warnings in 59.61s", {"passed": 415, "warnings": 26}),
    ("===== 2 failed, 400 passed, 1 error in 9.0s =====", {"failed": 2, "passed": 400,
                                                         "errors": 1}),
    ("no tests ran in 0.01s", {}),
])
def test_pytest_summary(line, counts):
    assert vm.parse_summary(line) == counts


def test_fixtures_pass_only_with_passes_and_no_failure():
    assert vm.fixtures_ok({"rc": 0, "summary": "229 passed in 400s"})
    assert not vm.fixtures_ok({"rc": 1, "summary": "1 failed, 228 passed in 400s"})
    assert not vm.fixtures_ok({"rc": 0, "summary": "no tests ran in 0.01s"})
    assert not vm.fixtures_ok({"rc": 0, "summary": "3 passed, 1 error in 1s"})
    assert not vm.fixtures_ok({"rc": None, "summary": "(the guest wrote no fixtures result)"})


def _result(tcp_at, udp_at, answered=None):
    received = {f"be{i + 1}": {"tcp": t, "udp": u} for i, (t, u) in enumerate(zip(tcp_at, udp_at))}
    sent = {"tcp": 50, "udp": 200}
    return {"sent": sent, "answered": answered or dict(sent), "received": received}


def test_traffic_verdict_wants_exact_counts_over_both_backends():
    assert vmnet.verdict(_result([20, 30], [90, 110])) == []
    assert vmnet.verdict(_result([20, 29], [90, 110])) == [
        "tcp: 50 sent, 49 at the backends"]
    assert vmnet.verdict(_result([50, 0], [90, 110])) == ["tcp: not spread over both backends"]
    assert "udp: 200 sent, 199 answered" in vmnet.verdict(
        _result([20, 30], [90, 110], {"tcp": 50, "udp": 199}))


def test_bpf_fixture_loads_from_the_environment(monkeypatch):
    monkeypatch.delenv(bpf_conftest.LOADS_ENV, raising=False)
    assert bpf_conftest.loads() == ["compiled", "cached"]
    monkeypatch.setenv(bpf_conftest.LOADS_ENV, "cached")
    assert bpf_conftest.loads() == ["cached"]
    monkeypatch.setenv(bpf_conftest.LOADS_ENV, "cahced")
    with pytest.raises(AssertionError, match="cahced"):
        bpf_conftest.loads()


# ---- native XDP on virtio-net (6.1) ------------------------------------------------------------


def bits(*on: int) -> str:
    return "".join("1" if i in on else "0" for i in range(64))


QEMU_DEFAULT = bits(0, 1, 2, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 32)


def test_qemus_default_virtio_net_takes_native_xdp():
    assert virtio.max_mtu() == 4064     # measured in the 6.1.0-57 guest
    assert virtio.problems(QEMU_DEFAULT, 1500) == []


def test_offloads_the_guest_cannot_turn_off_are_named_with_the_qemu_fix():
    no_ctrl = bits(0, 1, 7, 8, 15, 32)
    [p] = virtio.problems(no_ctrl, 1500)
    assert "guest_csum, guest_tso4, guest_tso6" in p
    assert "guest_csum=off,guest_tso4=off,guest_tso6=off" in p
    assert virtio.problems(bits(0, 15, 32), 1500) == []     # nothing offered: nothing to turn off


def test_an_mtu_above_one_page_is_refused_before_6_3_only():
    [p] = virtio.problems(QEMU_DEFAULT, 9000)
    assert "MTU 9000 is above 4064" in p
    assert virtio.problems(QEMU_DEFAULT, 4064) == []
    assert virtio.problems(QEMU_DEFAULT, 4065) != []
    assert virtio.problems(QEMU_DEFAULT, 9000, release=(6, 8)) == []


def test_mergeable_buffers_need_any_layout():
    [p] = virtio.problems(bits(0, 15), 1500)
    assert "ANY_LAYOUT" in p
    assert virtio.problems(bits(0, 15, 27), 1500) == []


def test_a_queue_note_when_xdp_sends_share_queues():
    assert virtio.queue_note(2, 4, 2) == ""
    assert virtio.queue_note(2, 8, 4) == ""
    note = virtio.queue_note(1, 1, 2, "eth0")
    assert "1 of 1 queue pairs" in note and "give the VM 4 queue pairs" in note
    assert "ethtool" not in note
    three = virtio.queue_note(2, 3, 2, "eth0")
    assert three.endswith("or use 1 (ethtool -L eth0 combined 1)")


def test_native_named_in_the_project_file_is_refused_in_one_line():
    with pytest.raises(loader.DatapathError) as err:
        loader.virtio_tries("eth0", "native", ["native"], "mode native set",
                            ["MTU 9000 is above 4064"])
    assert "\n" not in str(err.value)
    assert str(err.value) == ("cannot attach zfast to eth0 in native mode: virtio_net refuses "
                              "XDP here: MTU 9000 is above 4064")


def test_auto_goes_on_to_generic_and_says_why():
    tries, why = loader.virtio_tries("eth0", "auto", ["native", "generic"], "a NIC driver",
                                     ["MTU 9000 is above 4064"])
    assert tries == ["generic"]
    assert why == "a NIC driver; not native: virtio_net refuses XDP here (MTU 9000 is above 4064)"
    assert loader.virtio_tries("eth0", "native", ["native"], "w", []) == (["native"], "w")


def test_pktgen_nic_only_when_asked():
    assert vmnet.nic_opts(pktgen=True).count("-device") == 3
    assert f"virtio-net-pci,netdev=gen,mac={vmnet.GEN_MAC}" in vmnet.nic_opts(pktgen=True)
    assert set(vmnet.taps()) == {"pub", "priv"}


def test_pktgen_counts_must_agree_with_zfast_stats_and_the_backends():
    zfast = {"app": 9990, "10.1.0.2": 4340, "10.1.0.3": 5650}
    backends = ["10.1.0.2", "10.1.0.3"]
    assert vm.pktgen_verdict(9990, zfast, {"be1": 4340, "be2": 5650}, backends) == []
    assert vm.pktgen_verdict(68476, {**zfast, "app": 51844}, {"be1": 4340, "be2": 5650},
                             backends) == ["pktgen: sent 68476, zfast stats counted 51844"]
    assert vm.pktgen_verdict(9990, zfast, {"be1": 4339, "be2": 5650}, backends) == [
        "pktgen: zfast sent 4340 to be1, it received 4339"]
    assert vm.pktgen_verdict(None, zfast, {}, backends) == ["pktgen: no count of what it sent"]
