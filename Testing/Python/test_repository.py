"""What the repository says about itself holds: its licence, and examples that work on any machine."""

from __future__ import annotations

import re

from conftest import REPO


def test_the_license_file_is_the_apache_2_0_text_that_pyproject_declares():
    declared = re.search(r'^license = \{ text = "([^"]+)" \}', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert declared and declared.group(1) == "Apache-2.0"
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_the_readme_commands_use_no_one_machines_absolute_folders():
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S))
    assert commands, "the README has no bash example"
    assert not re.findall(r"(?<![\w.])/(?:work|home|Users|tmp)/\S*", commands)
