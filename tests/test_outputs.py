"""What an output may replace: every command with --force/--overwrite/--out, pointed at a run,
a dataset, its own inputs or a parent of them, is refused in one line and removes nothing;
an unwritable OUT is one line too; atomic folders swap by renames."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import invoke, tree
from liverseg import files


def run(*args):
    return invoke(*args, catch_exceptions=True)


def _refused(r, *words):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(trained_run, dataset, phantoms, tmp_path):
    """Copies of a trained run, its dataset and its phantoms under tmp_path/runs, records, nifti
    (the run's config pointed at the copied records), and their file trees."""
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "r1")
    shutil.copytree(dataset, tmp_path / "records")
    shutil.copytree(phantoms, tmp_path / "nifti")
    cfg = runs / "r1" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(dataset), str(tmp_path / "records")))
    before = {p: tree(tmp_path / p) for p in ("runs", "records", "nifti")}

    def unchanged():
        for p, names in before.items():
            assert tree(tmp_path / p) == names, p

    return tmp_path, unchanged


def test_force_never_replaces_a_run_a_dataset_or_an_input(work):
    root, unchanged = work
    r1, runs, records, nifti = root / "runs" / "r1", root / "runs", root / "records", root / "nifti"
    cases = [
        (("export", "--run", r1, r1, "--force"), (str(r1), "is a training run that this command reads")),
        (("export", "--run", r1, runs, "--force"), (f"holds {r1.resolve()}", "a training run")),
        (("export", "--run", r1, root, "--force"), ("holds",)),
        (("export", "--run", r1, records, "--force"), ("a converted dataset that this command reads",)),
        (("export", "--run", r1, nifti, "--force"), ("a folder of other files", "only an earlier export")),
        (("evaluate", "--run", r1, "--out", r1), ("is a training run that this command reads",)),
        (("evaluate", "--run", r1, "--out", runs), (f"holds {r1.resolve()}",)),
        (("evaluate", "--run", r1, "--out", records), ("a converted dataset that this command reads",)),
        (("evaluate", "--run", r1, "--out", nifti), ("only an earlier report",)),
        (("evaluate", "--run", r1, "--out", r1 / "checkpoints"), ("only an earlier report",)),
        (("cv", r1, "--out", runs), ("holds",)),
        (("predict", "--run", r1, nifti, "--out", nifti, "--force"), (f"--out {nifti} is an input",)),
        (("predict", "--run", r1, nifti / "phantom_001_orig.nii.gz", "--out", nifti, "--force"), ("holds",)),
        (("predict", "--run", r1, nifti, "--out", r1, "--force"), ("is a training run that this command reads",)),
        (("predict", "--run", r1, nifti, "--out", records, "--force"), ("is a converted dataset",)),
        (("convert", nifti, nifti, "--overwrite"), ("is an input of this command",)),
        (("convert", nifti, root, "--overwrite"), ("holds",)),
        (("convert", nifti, r1, "--overwrite"), ("is a training run",)),
    ]
    for args, words in cases:
        _refused(run(*args), *words)
        unchanged()


def test_force_replaces_an_earlier_export_and_nothing_else(work):
    root, unchanged = work
    r1, out = root / "runs" / "r1", root / "exports" / "e1"
    assert run("export", "--run", r1, out).exit_code == 0
    first = (out / "liverseg-model.json").stat().st_mtime_ns
    _refused(run("export", "--run", r1, out), "holds an earlier export; pass --force")
    assert run("export", "--run", r1, out, "--force").exit_code == 0
    assert (out / "liverseg-model.json").stat().st_mtime_ns != first
    assert not list(out.parent.glob(".partial-*")) and not list(out.parent.glob(".replaced-*"))
    # an export holding a run (moved there by hand) is not replaced either
    shutil.copytree(r1, out / "stray-run")
    _refused(run("export", "--run", r1, out, "--force"), "holds a training run", "stray-run")
    assert (out / "stray-run" / "run.json").is_file()
    unchanged()


def test_evaluate_replaces_its_own_report(work):
    root, unchanged = work
    r1, out = root / "runs" / "r1", root / "reports" / "test"
    assert run("evaluate", "--run", r1, "--out", out).exit_code == 0
    files = tree(out)
    assert "cases.csv" in files and "metrics.json" in files
    assert run("evaluate", "--run", r1, "--out", out).exit_code == 0  # re-run: the report replaced
    assert tree(out) == files
    (out / "notes.txt").write_text("mine")
    _refused(run("evaluate", "--run", r1, "--out", out), "only an earlier report")
    assert (out / "notes.txt").read_text() == "mine"


def test_predict_force_replaces_only_earlier_predictions(work):
    root, unchanged = work
    r1, nifti, out = root / "runs" / "r1", root / "nifti", root / "pred"
    scan = nifti / "phantom_001_orig.nii.gz"
    assert run("predict", "--run", r1, scan, "--out", out, "--prob").exit_code == 0
    assert run("predict", "--run", r1, scan, "--out", out, "--prob", "--force").exit_code == 0
    label = out / "phantom_001_liver.nii.gz"
    shutil.copy(nifti / "phantom_001_liver.nii.gz", label)  # the reference mask, where the prediction would go
    before = label.read_bytes()
    r = run("predict", "--run", r1, scan, "--out", out, "--force")  # a failed input: logged, then the summary line
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert (
        last.startswith("Error: 1 input(s) failed")
        and f"{label} exists and was not written by liverseg predict" in last
    ), r.output
    assert label.read_bytes() == before
    unchanged()


def test_synth_replaces_only_its_own_phantoms(tmp_path, shared_masks, real_ct):
    out = tmp_path / "phantoms"
    for _ in range(2):  # a re-run replaces its own phantoms
        assert run("synth", out, "--cases", 2, "--size", 24, "--slices", "6..6").exit_code == 0
    shutil.copy(shared_masks / "ircad_e02_liver.nii.gz", out / "phantom_002_liver.nii.gz")  # a real label of that name
    _refused(
        run("synth", out, "--cases", 2, "--size", 24, "--slices", "6..6"),
        "phantom_002_liver.nii.gz: exists and is not a liverseg phantom",
    )
    _refused(run("synth", shared_masks.parent, "--masks", shared_masks), "holds", "an input of this command")
    # 3D-IRCADb-01's tree holding the real patient 1: synth --layout ircad does not replace it
    tree_root = tmp_path / "ircad"
    shutil.copytree(real_ct / "ircad-01" / "PATIENT_DICOM", tree_root / "3Dircadb1.1" / "PATIENT_DICOM")
    before = tree(tree_root)
    _refused(
        run("synth", tree_root, "--cases", 1, "--size", 24, "--slices", "6..6", "--layout", "ircad"),
        "3Dircadb1.1: exists and is not a liverseg phantom",
    )
    assert tree(tree_root) == before


# ------------------------------------------------------------------------- unwritable OUT


@pytest.fixture
def read_only():
    """make(folder): the folder made unwritable (chmod for a user, chattr +i for root), checked
    to refuse a new entry; undone at the end. Skips where neither works."""
    done = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            done.append(lambda: folder.chmod(0o755))
        else:
            if (
                shutil.which("chattr") is None
                or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
            ):
                pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
            done.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
        try:
            (folder / "probe").mkdir()
        except OSError:
            return folder
        (folder / "probe").rmdir()
        pytest.skip(f"{folder} stays writable here")

    yield make
    for undo in reversed(done):
        undo()


def test_an_unwritable_out_is_one_line_and_nothing_is_removed(work, read_only):
    root, unchanged = work
    r1 = root / "runs" / "r1"
    locked = root / "locked"
    locked.mkdir()
    earlier = locked / "e1"
    assert run("export", "--run", r1, earlier).exit_code == 0
    files = tree(earlier)
    read_only(locked)
    # OUT in a folder that takes no new entry; an earlier export there with --force; OUT below it
    _refused(run("export", "--run", r1, locked / "new"), f"{locked}: cannot write here")
    _refused(run("export", "--run", r1, earlier, "--force"), f"{locked}: cannot write here")
    _refused(run("export", "--run", r1, locked / "a" / "b", "--force"), f"{locked}: cannot write here")
    _refused(run("evaluate", "--run", r1, "--out", locked / "report"), f"{locked}: cannot write here")
    _refused(run("predict", "--run", r1, root / "nifti", "--out", locked / "pred"), f"{locked}: cannot write here")
    _refused(run("convert", root / "nifti", locked / "rec"), f"{locked}: cannot write here")
    assert tree(earlier) == files and sorted(p.name for p in locked.iterdir()) == ["e1"]
    unchanged()
    # the earlier export itself unwritable (its parent writable): --force cannot empty it
    other = root / "other"
    assert run("export", "--run", r1, other).exit_code == 0
    files = tree(other)
    read_only(other)
    _refused(run("export", "--run", r1, other, "--force"), f"{other}: cannot write here")
    _refused(run("predict", "--run", r1, root / "nifti", "--out", other), f"{other}")
    assert tree(other) == files


# ------------------------------------------------------------------------- atomic folders


def test_a_failed_folder_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    old = tmp_path / "out"
    old.mkdir()
    (old / "a.txt").write_text("old")
    real = Path.replace

    def failing(self, target):
        if self.name == ".partial-out":
            raise OSError(5, "Input/output error")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    with pytest.raises(OSError):
        with files.new_folder(old) as tmp:
            (tmp / "b.txt").write_text("new")
    assert tree(tmp_path) == ["out/a.txt"]  # the old folder back in place, no partial or aside copy
    monkeypatch.setattr(Path, "replace", real)
    with files.new_folder(tmp_path / "x" / "y" / "out") as tmp:
        (tmp / "b.txt").write_text("new")
    assert tree(tmp_path) == ["out/a.txt", "x/y/out/b.txt"]
    with pytest.raises(RuntimeError):
        with files.new_folder(tmp_path / "p" / "q" / "out"):
            raise RuntimeError("fails part-way")
    assert not (tmp_path / "p").exists()  # parents it created are gone again


def test_train_never_writes_into_an_export_a_dataset_or_a_folder_of_other_files(work):
    """--run at an export (its run.json and config.yaml), the dataset it reads or a folder inside
    it, a folder of scans, a checkout: refused before anything is written, every byte kept."""
    root, unchanged = work
    r1, records, nifti, export = root / "runs" / "r1", root / "records", root / "nifti", root / "exports" / "e1"
    assert run("export", "--run", r1, export).exit_code == 0
    checkout = root / "checkout"
    (checkout / "liverseg").mkdir(parents=True)
    (checkout / "README.md").write_text("a source checkout")
    folders = (export, records, nifti, checkout)
    before = {f: {p: (f / p).read_bytes() for p in tree(f)} for f in folders}
    for target, words in [
        (export, ("is an export",)),
        (records, ("is a converted dataset that this command reads",)),
        (records / "run", ("lies inside", "which is a converted dataset")),
        (nifti, ("holds files that are not a training run's", "phantom_001_liver.nii.gz")),
        (checkout, ("holds files that are not a training run's", "README.md")),
    ]:
        _refused(run("train", "--config", "smoke", "--records", records, "--run", target), f"--run {target}", *words)
    assert {f: {p: (f / p).read_bytes() for p in tree(f)} for f in folders} == before
    assert not (records / "run").exists()
    unchanged()


def test_a_symbolic_link_as_a_replaced_output_is_refused_before_any_work(work):
    root, unchanged = work
    r1, target = root / "runs" / "r1", root / "real-folder"
    target.mkdir()
    link = root / "link"
    link.symlink_to(target)
    for args in (
        ("export", "--run", r1, link, "--force"),
        ("evaluate", "--run", r1, "--out", link),
        ("cv", r1, "--out", link),
    ):
        _refused(run(*args), f"{link} is a symbolic link (to {target})")
    assert link.is_symlink() and list(target.iterdir()) == []
    unchanged()
