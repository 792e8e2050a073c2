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


def test_the_repository_holds_no_patch_leftovers_or_editor_backups():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert tracked, "not a git checkout"
    assert not [p for p in tracked if re.search(r"(\.orig|\.rej|\.bak|~)$", p)]


def test_the_readme_layout_names_every_module_of_every_wing():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for wing in sorted(p for p in (REPO / "PRLDetectorLib").iterdir() if (p / "__init__.py").is_file()):
        row = re.search(rf"^\| `PRLDetectorLib/{wing.name}/` \|(.*)$", readme, re.M)
        assert row, f"the README's layout has no row for {wing.name}/"
        for module in sorted(p.stem for p in wing.glob("*.py") if p.stem != "__init__"):
            assert f"`{module}`" in row.group(1), f"the layout row of {wing.name}/ does not name `{module}`"
