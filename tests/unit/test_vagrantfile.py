"""The Vagrant lab is provisioned with the README's own set-up command and nothing else."""

import re
from pathlib import Path

VAGRANTFILE = Path(__file__).resolve().parents[2] / "vagrant" / "Vagrantfile"


def test_balancers_are_provisioned_only_with_the_readme_command():
    text = VAGRANTFILE.read_text()
    inlines = re.findall(r'provision :shell, inline: "([^"]*)"', text)
    assert inlines, "no provisioning found"
    zfast = [cmd for cmd in inlines if "zfast" in cmd or "run.sh" in cmd or "bootstrap" in cmd]
    assert zfast and all(re.fullmatch(r"cd /vagrant && \./run\.sh (test|demo)\b.*", c) for c in zfast)
    assert "virtio" in text and ":libvirt" in text and ":virtualbox" in text
    for name in ("client", "lb-a", "lb-b", "be1", "be2"):
        assert f'"{name}"' in text
