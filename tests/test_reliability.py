"""Faults as a user meets them: a training process killed (SIGKILL) in the middle of each file write, run
folders moved or read from another cwd, flipped bytes in every kind of file the package writes, a full
disk, two runs on one folder, SIGTERM during the demo, a missing optional dependency."""

import errno
import json
import os
import pathlib
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import pytest
import torch
from torch import nn

import fastcascade.adapters as A
import fastcascade.data as fd
from fastcascade import _io
from fastcascade import train as T

posix_only = pytest.mark.skipif(os.name != "posix" or not pathlib.Path("/proc/self/fd").is_dir(),
                                reason="needs POSIX signals and /proc")


pytestmark = pytest.mark.usefixtures("one_thread")


# The training run the crash tests kill and resume: small, seeded, and chosen so that the monitored F1
# improves at epochs 1, 2, 3 and 5 but not at 4, 6, 7 (the reference run checks this pattern), so
# there are kills in improving epochs whose best epoch stays the best to the end, and kills in epochs
# whose best epoch is an earlier one.
RUN = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from fastcascade import train as T

    def task(n=600, seed=0, classes=3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        w = torch.randn(8, classes, generator=g)
        y = (x @ w + torch.randn(n, classes, generator=g)).argmax(1)
        return TensorDataset(x[:450], y[:450]), TensorDataset(x[450:], y[450:])

    def run(out_dir, resume=None, seed=4, epochs=7):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        train, val = task()
        history, best = T.fit(model, nn.functional.cross_entropy, train, val, epochs, lr=0.1, batch_size=64,
                              seed=seed, schedule=None, checkpoint_every=1, out_dir=out_dir, resume=resume,
                              progress=False)
        return history, best, model
''')
_ns = {}
exec(compile(RUN, "<crash-test run>", "exec"), _ns)
run = _ns["run"]
IMPROVING = [True, True, True, False, True, False, False]
BEST = 5

# Runs RUN in a child that SIGKILLs itself at one write: argv = out_dir, file name, epoch, when[, epochs].
#   mid-write      half of the first chunk of that file's temporary file is written, then the kill
#   before-rename  the temporary file is complete and fsynced, not yet renamed onto the file
#   after-rename   right after the rename
# The epoch of a write is the epoch whose last.pt is being (or was last) written: fit writes last.pt first.
KILLER = RUN + textwrap.dedent('''
    import os, signal, sys
    out, name, epoch, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 7
    done = {"last": 0}
    real_replace, real_write = os.replace, os.write

    def epoch_of(target):
        return done["last"] + (target == "last.pt")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def replace(src, dst, *a, **k):
        target = os.path.basename(dst)
        hit = target == name and epoch_of(target) == epoch
        if hit and when == "before-rename":
            die()
        r = real_replace(src, dst, *a, **k)
        done["last"] += target == "last.pt"
        if hit and when == "after-rename":
            die()
        return r

    def write(fd, data):
        if when == "mid-write" and epoch_of(name) == epoch:
            try:
                f = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                f = ""
            if f.startswith(f".{name}.") and f.endswith(".tmp"):
                real_write(fd, bytes(memoryview(data).cast("B")[: max(1, len(data) // 2)]))
                die()
        return real_write(fd, data)

    os.replace, os.write = replace, write
    run(out, epochs=epochs)
    print("the run ended without reaching its kill point")
    sys.exit(3)
''')


def _no_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its history, its final (= best) weights and its files."""
    out = tmp_path_factory.mktemp("reference")
    history, best, model = run(out)
    v, top, pattern = [r["val"]["macro_f1"] for r in history], -1.0, []
    for x in v:
        pattern.append(x > top)
        top = max(top, x)
    assert pattern == IMPROVING, f"the reference run no longer has the improvement pattern the kills need: {v}"
    assert best == out / "best.pt" and T.load_checkpoint(best, run_model())["epoch"] == BEST
    return {"history": history, "weights": _state(model), "files": sorted(p.name for p in out.iterdir())}


def run_model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _check_like_reference(reference, history, best, model, out, same_files=True):
    assert _no_seconds(history) == _no_seconds(reference["history"])  # every epoch, bitwise
    assert _same(_state(model), reference["weights"])  # the best epoch's weights, restored
    assert best == out / "best.pt"
    m = run_model()
    assert T.load_checkpoint(best, m)["epoch"] == BEST and _same(_state(m), reference["weights"])
    assert json.loads((out / "history.json").read_text()) == json.loads(json.dumps(history))
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n == _io.LOCK_NAME], names
    if same_files:  # resumed in place: the folder holds what the uninterrupted run's holds
        assert names == reference["files"]


KILLS = [
    ("last.pt", BEST, "after-rename"),   # last.pt says "best epoch 5", best.pt still holds epoch 3
    ("best.pt", BEST, "mid-write"),      # the same, with a half-written temporary best.pt
    ("last.pt", BEST, "mid-write"),      # back to epoch 4's files, with a half-written temporary last.pt
    ("last.pt", 4, "after-rename"),      # a non-improving epoch: the best weights are epoch 3's
    ("epoch-0004.pt", 4, "before-rename"),
    ("best.pt", 3, "after-rename"),      # history.json not yet written
    ("history.json", BEST, "mid-write"),
]


def _kill_run(tmp_path, name, epoch, when, epochs=7):
    """Run RUN into tmp_path / "run" in a child that SIGKILLs itself at that write; returns the folder."""
    out = tmp_path / "run"
    child = tmp_path / "child.py"
    child.write_text(KILLER)
    r = subprocess.run([sys.executable, str(child), str(out), name, str(epoch), when, str(epochs)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    return out


@posix_only
@pytest.mark.parametrize("name, epoch, when", KILLS, ids=[f"{n}-epoch{e}-{w}" for n, e, w in KILLS])
def test_sigkill_at_each_write_then_resume_equals_the_uninterrupted_run(tmp_path, reference, name, epoch, when):
    out = _kill_run(tmp_path, name, epoch, when)
    left = sorted(p.name for p in out.iterdir())
    if when == "mid-write" or when == "before-rename":
        assert any(n.startswith(f".{name}.") and n.endswith(".tmp") for n in left), left
    assert _io.LOCK_NAME in left  # the killed run's lock file is still there: it must not block the resume
    history, best, model = run(out, resume=out / "last.pt")
    _check_like_reference(reference, history, best, model, out)


@posix_only
def test_a_run_killed_in_its_final_best_epoch_is_refused_by_load_and_repaired_by_resume(tmp_path, reference):
    """The run's final epoch is its best; the kill comes after last.pt names it and before best.pt is copied.
    best.pt still holds the previous best epoch: load_checkpoint refuses it and names the repair, resume
    of the finished run trains nothing and brings best.pt and history.json in line, and says so."""
    out = _kill_run(tmp_path, "last.pt", BEST, "after-rename", epochs=BEST)
    assert len(json.loads((out / "history.json").read_text())) == BEST - 1
    stale = run_model()
    before = _state(stale)
    with pytest.raises(ValueError, match=r"holds epoch 3, but .*last\.pt next to it says the run's best epoch "
                                         r"is 5.*resume=.*last\.pt.*check_folder=False") as e:
        T.load_checkpoint(out / "best.pt", stale)
    assert str(out) in str(e.value) and _same(_state(stale), before)  # nothing loaded
    assert T.load_checkpoint(out / "best.pt", stale, check_folder=False)["epoch"] == 3  # deliberately
    assert T.load_checkpoint(out / "last.pt", run_model())["epoch"] == BEST  # last.pt is not checked
    with pytest.warns(UserWarning, match=r"had finished \(epoch 5, best epoch 5\), so nothing was trained.*"
                                         r"best\.pt now holds epoch 5 \(it held epoch 3\).*history\.json now "
                                         r"holds its 5 epochs"):
        history, best, model = run(out, resume=out / "last.pt", epochs=BEST)
    assert _no_seconds(history) == _no_seconds(reference["history"][:BEST])
    assert _same(_state(model), reference["weights"])  # the best epoch is 5 in both runs
    m = run_model()
    assert best == out / "best.pt" and T.load_checkpoint(best, m)["epoch"] == BEST
    assert _same(_state(m), reference["weights"])
    assert json.loads((out / "history.json").read_text()) == json.loads(json.dumps(history))
    # the folder now holds what an uninterrupted 5-epoch run leaves
    assert sorted(p.name for p in out.iterdir()) == sorted([f"epoch-{k:04d}.pt" for k in range(1, BEST + 1)] + [
        "best.pt", "history.json", "last.pt"])
    # a consistent finished run resumes quietly: nothing rewritten, nothing trained
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _, _ = run(out, resume=out / "last.pt", epochs=BEST)
    assert again == history and {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match=r"at epoch 5, past epochs=4"):
        run(out, resume=out / "last.pt", epochs=4)


def test_a_best_pt_of_another_run_beside_last_pt_is_refused(tmp_path):
    """A second run on an old folder killed in its first epoch between last.pt and best.pt: best.pt is the
    first run's."""
    run(tmp_path / "a", epochs=1)
    run(tmp_path / "b", epochs=2, seed=5)
    shutil.copy(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt next to it belongs to another run.*resume="):
        T.load_checkpoint(tmp_path / "b" / "best.pt", run_model())
    (tmp_path / "b" / "last.pt").unlink()  # no last.pt beside it: nothing to check against
    T.load_checkpoint(tmp_path / "b" / "best.pt", run_model())


def test_resume_from_a_moved_folder(tmp_path, reference):
    """The demo renames its run folder at the end: resuming from the moved files must not depend on any
    path stored in them. Epoch 6's best epoch is 5, and epoch 7 does not improve: the best weights come
    from the checkpoint, never from the model's own epoch-6 weights."""
    run(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    history, best, model = run(tmp_path / "c", resume=tmp_path / "b" / "epoch-0006.pt")
    _check_like_reference(reference, history, best, model, tmp_path / "c", same_files=False)


def test_resume_with_a_relative_out_dir_from_another_cwd(tmp_path, reference, monkeypatch):
    """Two runs with out_dir="run" in two folders; resuming the first from the second's cwd must not pick up
    the second run's best.pt."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    run("run")
    monkeypatch.chdir(tmp_path / "y")
    run("run", seed=5)  # another run, another best.pt at y/run/best.pt
    history, best, model = run(tmp_path / "x" / "resumed", resume=tmp_path / "x" / "run" / "epoch-0006.pt")
    _check_like_reference(reference, history, best, model, tmp_path / "x" / "resumed", same_files=False)


def test_resume_of_an_old_format_checkpoint_checks_the_epoch_of_best_pt(tmp_path, reference):
    """Checkpoints of the previous format carry neither the best weights nor a checksum: best.pt next to the
    checkpoint is used only when it holds the best epoch of that run; otherwise resume refuses."""
    run(tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "epoch-0006.pt", weights_only=True)
    ckpt["format"] = "fastcascade.checkpoint/1"
    for k in ("checksum", "optimizer_class", "scheduler_class"):
        del ckpt[k]
    fit_state = ckpt["extra"]["fit"]
    del fit_state["best_model"], fit_state["run_id"]
    fit_state["best_path"] = "/nowhere/best.pt"  # what the old format stored
    torch.save(ckpt, tmp_path / "a" / "old.pt")
    with pytest.warns(UserWarning, match="no checksum"):
        history, best, model = run(tmp_path / "b", resume=tmp_path / "a" / "old.pt")
    _check_like_reference(reference, history, best, model, tmp_path / "b", same_files=False)
    shutil.copy(tmp_path / "a" / "epoch-0004.pt", tmp_path / "a" / "best.pt")  # now best.pt holds epoch 4
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"best epoch is 5.*holds epoch 4"):
        run(tmp_path / "c", resume=tmp_path / "a" / "old.pt")


# ---------------------------------------------------------------------------------------------
# the folder lock


def test_a_second_fit_on_a_locked_folder_refuses(tmp_path):
    with _io.lock_folder(tmp_path, "a test"):
        with pytest.raises(RuntimeError, match=r"in use by another run \(pid \d+ on .*a test"):
            run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, the lock file removed
    with pytest.raises(ValueError, match="no rows"):  # fails before writing: no folder left behind either
        T.fit(run_model(), nn.functional.cross_entropy, *_ns["task"](), 1, out_dir=tmp_path / "new",
              target_fn=lambda y: torch.full_like(y, -100), progress=False)
    assert not (tmp_path / "new").exists()


@posix_only
def test_the_lock_of_another_live_process_refuses_and_a_dead_ones_does_not_block(tmp_path):
    code = ("import sys, time, fastcascade._io as io\n"
            "with io.lock_folder(sys.argv[1], 'holder'):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"pid {child.pid} on"):
            run(tmp_path)
    finally:
        child.kill()  # SIGKILL: no cleanup runs, the lock file stays
        child.wait()
        child.stdout.close()
    assert (tmp_path / _io.LOCK_NAME).exists()
    history, best, _ = run(tmp_path, epochs=1)
    assert len(history) == 1 and best.is_file() and not (tmp_path / _io.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# temporary files, permissions, fsync, full disks


def test_the_next_writer_removes_temporary_files_of_dead_writers_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"], cwd=tmp_path)
    dead.wait()
    host = _io._host()
    names = {f".last.pt.0badf00d.{dead.pid}@{host}.tmp": False,        # its writer is gone: removed
             f".best.pt.0badf00d.{os.getpid()}@{host}.tmp": True,     # a live writer's: kept
             f".last.pt.0badf00d.{dead.pid}@another-host.tmp": True,  # another host's pid: unknown, kept
             ".notes.tmp": True}                                      # not ours
    for n in names:
        (tmp_path / n).write_bytes(b"partial")
    T.save_checkpoint(tmp_path / "x.pt", run_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([n for n, kept in names.items() if kept] + ["x.pt"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = [T.save_checkpoint(tmp_path / "c.pt", run_model()), _io.write_json({"a": 1}, tmp_path / "h.json"),
                 fd.save_block_dataset(tmp_path / "train.pt", torch.zeros(2, 1, 16, 16, dtype=torch.uint8),
                                       torch.zeros(2, dtype=torch.int64))]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


@posix_only
def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file", st.st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", pathlib.Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    T.save_checkpoint(tmp_path / "c.pt", run_model())
    kinds = [e[0] for e in events]
    assert kinds == ["fsync-file", "replace", "fsync-dir"], events
    assert events[2][1] == tmp_path.stat().st_ino


def test_disk_full_names_the_path_and_leaves_the_old_file(tmp_path, monkeypatch):
    real_write = os.write
    targets = {"c.pt": lambda p: T.save_checkpoint(p, run_model()),
               "h.json": lambda p: _io.write_json({"a": list(range(100))}, p),
               "train.pt": lambda p: fd.save_block_dataset(p, torch.zeros(2, 1, 16, 16, dtype=torch.uint8),
                                                           torch.zeros(2, dtype=torch.int64))}
    for name, write in targets.items():
        write(tmp_path / name)
    before = {n: (tmp_path / n).read_bytes() for n in targets}

    def full(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    for name, write in targets.items():
        with pytest.raises(OSError, match="no space left on the device") as e:
            write(tmp_path / name)
        assert e.value.errno == errno.ENOSPC and str(tmp_path / name) in str(e.value)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in targets} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(targets)


@posix_only
def test_a_real_write_failure_inside_torch_save_is_reported_with_its_errno(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE, EFBIG) in the middle of torch.save: the error says what
    happened and names the file, instead of torch's "[enforce fail at inline_container.cc] unexpected pos"."""
    code = textwrap.dedent(f"""
        import errno, resource, signal, sys, torch
        from fastcascade import train as T
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            T.save_checkpoint({str(tmp_path / 'big.pt')!r}, torch.nn.Linear(300, 300))
        except OSError as e:
            print(errno.errorcode[e.errno], e)
            sys.exit(0)
        sys.exit(1)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("EFBIG") and str(tmp_path / "big.pt") in r.stdout and "enforce" not in r.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# integrity: one flipped byte in tensor data, in every kind of file the package writes


def _storages(path):
    """{entry name: (offset in the file, size)} of the tensor storages in a torch.save zip file."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and not info.filename.rsplit("/", 1)[1].startswith("."):
                f.seek(info.header_offset)
                n, extra = struct.unpack("<HH", f.read(30)[26:30])
                out[info.filename] = (info.header_offset + 30 + n + extra, info.file_size)
    return out


def flip_byte(path, holding: torch.Tensor | None = None):
    """Flip one bit in the middle of a tensor's data in a torch.save file: the storage whose bytes are
    `holding`'s, else the largest one."""
    data = bytearray(pathlib.Path(path).read_bytes())
    entries = _storages(path)
    if holding is not None:
        raw = holding.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        entries = {k: v for k, v in entries.items() if bytes(data[v[0]:v[0] + v[1]]) == raw}
        assert entries, "no storage holds that tensor"
    offset, size = max(entries.values(), key=lambda e: e[1])
    data[offset + size // 2] ^= 0x04
    pathlib.Path(path).write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_refused(tmp_path):
    model = run_model()
    path = T.save_checkpoint(tmp_path / "c.pt", model)
    flip_byte(path)
    assert torch.load(path, weights_only=True)  # torch itself notices nothing
    fresh = run_model()
    before = _state(fresh)
    with pytest.raises(ValueError, match="is damaged: its content does not match the checksum"):
        T.load_checkpoint(path, fresh)
    assert _same(_state(fresh), before)


def test_a_flipped_byte_in_an_adapter_state_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    A.add_adapters(model, ["2"], bottleneck=4, channels=8)
    A.freeze_backbone(model, trainable=("adapter",))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not a freshly initialised (zero) up-projection
    torch.save(A.adapter_state_dict(model), tmp_path / "a.pt")
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    A.load_adapter_state_dict(model, state)  # intact: loads
    flip_byte(tmp_path / "a.pt", holding=state[max((k for k in state if k != A.META_KEY),
                                                   key=lambda k: state[k].numel())])
    with pytest.raises(ValueError, match="adapter state is damaged: its content does not match"):
        A.load_adapter_state_dict(model, torch.load(tmp_path / "a.pt", weights_only=True))


def test_a_flipped_byte_in_a_block_file_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 8, (20,), generator=g)
    path = fd.save_block_dataset(tmp_path / "16x16" / "train.pt", blocks, labels)
    assert torch.equal(fd.load_block_dataset(tmp_path).labels, labels)
    flip_byte(path, holding=labels)
    with pytest.raises(ValueError, match=r"train\.pt is damaged"):
        fd.load_block_dataset(tmp_path)


def test_a_flipped_byte_in_the_dataset_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """The cache's labels with one bit changed are labels of other blocks: they must not be used."""
    cache = tmp_path / "cache"
    good = fd.load_partition_dataset("all", cache_dir=cache, verbose=False)
    (path,) = cache.glob("partition16-*.pt")
    flip_byte(path, holding=good.labels)
    with pytest.warns(RuntimeWarning, match="does not match the checksum.*rebuilding"):
        again = fd.load_partition_dataset("all", cache_dir=cache, verbose=False)
    assert torch.equal(again.labels, good.labels) and torch.equal(again.blocks, good.blocks)
    # an incomplete cache (an entry missing, ids out of range): rebuilt too, never a KeyError / IndexError
    for damage in (lambda d: d.pop("labels"), lambda d: d["image_ids"].fill_(99)):
        data = torch.load(path, weights_only=True)
        damage(data)
        torch.save(data, path)
        with pytest.warns(RuntimeWarning, match="rebuilding"):
            again = fd.load_partition_dataset("val", cache_dir=cache, verbose=False)
        assert torch.equal(again.labels, fd.load_partition_dataset("val", cache_dir=cache).labels)


# ---------------------------------------------------------------------------------------------
# the demo command line


def _partial_folders(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


@posix_only
def test_sigterm_removes_the_demo_partial_folder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "fastcascade", "demo", "--quick", "--no-progress", "--out",
                             str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not _partial_folders(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _partial_folders(tmp_path), "the demo made no partial folder"
        time.sleep(1.0)  # into training: checkpoints are being written
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    assert _partial_folders(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize("module,package", [("matplotlib", "matplotlib"), ("skimage", "scikit-image")])
def test_demo_checks_its_dependencies_before_training(tmp_path, capsys, monkeypatch, module, package):
    from fastcascade.__main__ import main

    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    t = time.perf_counter()
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert f"{module} is not installed" in captured.err and f"pip install {package}" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "training" not in captured.out and time.perf_counter() - t < 30
    assert list(tmp_path.iterdir()) == []
