"""Run a stage script in a process that already has torch and mlflow imported.

    python -m cifarcnn.warm stages/train.py task2 0      # what dvc.yaml runs
    CIFARCNN_WARM=0 dvc repro                            # every stage in a fresh interpreter

Importing torch, torchvision and mlflow costs a stage process 3-6 s of CPU on a 2-core machine
(bench/results/tiny_cpu_*.json), more than a tiny stage's work. So the first stage that finds no
server starts one in the background and runs cold itself; a stage that comes while that server is
still importing waits for it (at most WAIT_S) rather than import everything a second time, except
the EARLY ones (the data stages, which use torch alone): once torch is imported, a fork of the
server (the early server) takes those while the server imports the rest, and stops when the server
is ready. The server imports those libraries once, and every later stage (same Python, same
packages, CPUs and start-up environment: _key) is a fork of it, like multiprocessing's forkserver
or Android's zygote. The fork gets the stage's argv, working directory, environment, umask and
stdin/stdout/stderr (the file descriptors themselves), imports the project's modules afresh from
the stage's own sys.path (an edit is never served stale), and runs the script as ``__main__``. This
process stays the stage for DVC: it forwards SIGINT/SIGTERM/SIGHUP to the fork and ends with the
fork's status (a fork killed by a signal kills this process with the same signal). If this process
dies (SIGKILL included), the fork is SIGKILLed at once (it watches this process; the server, too).

The server listens on a Unix socket in a folder only this user can open (checked), answers
only this user's processes (SO_PEERCRED), and exits after CIFARCNN_WARM_IDLE_S (default 60)
seconds with no stage. Its log, a line per stage, is ``<folder>/<key>.log``; the folder is
$CIFARCNN_WARM_DIR or /tmp/cifarcnn-warm-<uid>. A starting server removes other keys' files that
no stage has used for 7 days. Nothing here imports a project module, so the
launcher is not a dependency of any stage (editing it re-runs nothing).
"""
from __future__ import annotations

import array
import fcntl
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

# What stages would import cold, and MLflow's sqlite store (sqlalchemy, alembic), which it imports
# on first use: 3-4 s of CPU once here instead of in every stage. The server takes stages once
# PRELOAD (what the data stages and the train stages of the small CNNs use) is imported: the first
# train stage of a `dvc repro` from scratch waits for it. LATER (3 s), which those stages do not
# use, a successor imports: a fork of the server that then takes the stages on the same socket,
# while the server takes them meanwhile (so no stage waits for an import) and ends once those it
# took have ended. LATER is in the order a `dvc repro` needs it: torchvision (1.5 s with the
# torch._dynamo it imports: task4a's ResNet18, visualize), matplotlib and MLflow's pyfunc (the
# evaluate stages' figures and model logging; 0.3 s that the first train stage waited for when
# they were in PRELOAD), the report's scipy.stats, and tabulate (torch._dynamo's exit handler
# imports it in every process that has torch._dynamo: 20 ms a stage). A stage forked before the
# successor takes over imports what it uses of it itself.
# Each list ends with what MLflow imports on first use inside a stage rather than at import (30 ms
# in a train stage: the store's sqlite dialect and schema check, system metrics, tracing; 90 ms in
# an evaluate stage: GitPython for the run's commit, the model's serving-input check, PNG writing).
# None of them starts a Python thread (the server logs how many it has; tests/test_warm.py): a fork
# gets only the thread that forked.
PRELOAD = ("torch", "mlflow",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.db.utils",
           "sqlalchemy.dialects.sqlite", "alembic.command", "mlflow.store.tracking.sqlalchemy_workspace_store",
           "mlflow.system_metrics.system_metrics_monitor", "mlflow.tracing.processor.otel",
           "mlflow.tracing.export.utils", "torch.utils.serialization")
LATER = ("torchvision", "matplotlib", "matplotlib.pyplot", "mlflow.pyfunc", "scipy.stats", "tabulate",
         "git", "mlflow.pyfunc.scoring_server", "mlflow.models.display_utils", "matplotlib.backends.backend_agg",
         "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.JpegImagePlugin", "PIL.PpmImagePlugin", "pyarrow.pandas_compat")
# The stage scripts that use no more of PRELOAD than torch: the data stages, which a `dvc repro`
# from scratch runs while the server is still importing. The early server (a fork of the server
# made once torch is imported) takes them meanwhile; any other stage waits for the server.
# tests/test_warm.py holds each of them to importing nothing else of PRELOAD.
EARLY = ("code.py", "source.py", "download.py", "configure.py", "split.py")
# Environment read once at start-up, so a fork keeps the server's: Python's, libc's locale, and the
# thread pools' of OpenMP, MKL and BLAS (torch.get_num_threads follows OMP_NUM_THREADS at import).
STARTUP_ENV = ("PYTHON", "LC_", "LANG", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_")
IDLE_S = float(os.environ.get("CIFARCNN_WARM_IDLE_S", "60"))  # seconds with no stage before the server exits
# Seconds a stage waits for a server that is still importing before it runs cold instead. A
# server is ready 3-6 s after it starts on 2 quiet cores (its early server in 1.5-2 s), and a
# stage that came meanwhile would import torch (and MLflow) cold for 1.5-4 s: waiting costs it
# less than that, and CPU the server needs goes to neither.
WAIT_S = 60.0
POLL_S = 0.05  # seconds between a waiting stage's tries to connect
STALE_S = 7 * 86400  # seconds: another key's files unused this long are removed when a server starts
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LAUNCHER_ENV = "CIFARCNN_WARM_LAUNCHER"  # in a fork: the pid of the process DVC started for it (errors.py reads it)
_LEN = struct.Struct("!I")


# --- where the server lives ------------------------------------------------------------------

def _folder() -> Path | None:
    """The socket folder, made 0700 and checked to be this user's alone; None when it is not.
    Absolute: the server runs from "/"."""
    folder = Path(os.environ.get("CIFARCNN_WARM_DIR") or f"/tmp/cifarcnn-warm-{os.getuid()}").absolute()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None  # someone else could connect to (or replace) the socket: run cold
    return folder


SUN_PATH = 108  # bytes: the longest address a Unix socket takes (struct sockaddr_un), NUL included


def _address(path: Path, call) -> None:
    """``call`` (sock.bind or sock.connect) with ``path``; a path too long for an address (a deep
    CIFARCNN_WARM_DIR) is reached through an open descriptor of its folder, /proc/self/fd/<fd>/<name>."""
    if len(os.fsencode(path)) < SUN_PATH:
        call(str(path))
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        call(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def _key(path: list[str]) -> str:
    """What a fork inherits from the server and cannot change: the interpreter, its flags, the
    import path and the preloaded packages' files (an upgrade starts a new server), the
    environment that Python, libc and OpenMP/MKL read at start-up, the CPUs it may run on (torch
    sizes its thread pool from them and OMP_NUM_THREADS when it is imported: a fork with more
    threads than CPUs spin-waits), the control group and nice value, and this launcher's own code."""
    stamps = []
    for name in ("torch", "torchvision", "mlflow", "matplotlib"):
        try:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec else None
            stamps.append((name, origin, os.stat(origin).st_mtime_ns if origin else None))
        except (ImportError, ValueError, OSError):
            stamps.append((name, None, None))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(STARTUP_ENV))
    try:  # a batch job's own cgroup (its CPU, memory and device limits): never another job's server
        cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        cgroup = ""
    mine = Path(__file__).read_bytes()
    blob = json.dumps([os.path.realpath(sys.executable), sys.version, list(sys.flags), path, stamps, env, cgroup,
                       sorted(os.sched_getaffinity(0)), os.getpriority(os.PRIO_PROCESS, 0),
                       hashlib.sha256(mine).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- messages: a 4-byte length, then JSON ----------------------------------------------------

def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    data = _LEN.pack(len(data)) + data
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    buf = b""
    while len(buf) < n:
        data, ancdata, _, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(16 * array.array("i").itemsize))
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(raw[:len(raw) - len(raw) % got.itemsize])
                fds.extend(got)
        if not data:
            raise EOFError
        buf += data
    return buf


def _recv(sock: socket.socket) -> tuple[dict, list[int]]:
    fds: list[int] = []
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds))
    return json.loads(_recv_exact(sock, n, fds)), fds


# --- the stage's side ------------------------------------------------------------------------

def _cold(argv: list[str]) -> None:
    """Become the stage in a fresh interpreter, as if DVC had run `python <script> ...`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def _start_server(folder: Path, key: str, path: list[str]) -> bool:
    """Start the server in the background; False when one holds <key>.lock (starting or running).
    The lock goes to the server still held (the same open file), so no second stage can take it
    in between and start another."""
    lock = open(folder / f"{key}.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no server holds it
    except OSError:
        lock.close()
        return False
    env = dict(os.environ)  # the server must import cifarcnn.warm from "/" as the stage would from its folder
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    with lock, open(folder / f"{key}.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "cifarcnn.warm", "--serve", str(folder), key, str(lock.fileno())],
                         cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         close_fds=True, pass_fds=(lock.fileno(),))
    return True


def _connect(folder: Path, key: str, early: bool = False) -> socket.socket | None:
    """A connection to the server, or with ``early`` to the early server when there is no server
    yet; None when neither answers."""
    for name in (f"{key}.sock", f"{key}.early.sock") if early else (f"{key}.sock",):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _address(folder / name, sock.connect)
            return sock
        except OSError:
            sock.close()
    return None


def _wait_for_server(folder: Path, key: str, early: bool = False) -> socket.socket | None:
    """A connection to the server that holds <key>.lock once it is ready (or to its early server,
    with ``early``); None when it stops holding the lock first (it failed, or it exited), when it
    said it takes no stage (<key>.cold), or after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        sock = _connect(folder, key, early)
        if sock is not None:
            return sock
        if (folder / f"{key}.cold").exists():
            return None
        try:
            with open(folder / f"{key}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: no server holds it any more
            return None
        except OSError:
            time.sleep(POLL_S)
    return None


def launch(argv: list[str]) -> None:
    """Run ``argv`` (a script and its arguments) in a fork of the warm server, or cold."""
    path = [os.path.abspath(p) for p in sys.path[1:]]  # sys.path[0] is the folder `-m` ran from
    folder = _folder() if os.environ.get("CIFARCNN_WARM", "1") != "0" else None
    if folder is None:
        _cold(argv)
    key = _key(path)
    early = os.path.basename(argv[0]) in EARLY
    sock = _connect(folder, key, early)
    if sock is None:
        if _start_server(folder, key, path):  # none was running: this stage runs cold while it starts
            _cold(argv)
        try:
            sock = _wait_for_server(folder, key, early)  # one is starting: its fork beats importing everything again
        except KeyboardInterrupt:  # stopped while waiting, before anything ran: no traceback
            os._exit(128 + signal.SIGINT)
        if sock is None:
            _cold(argv)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": path, "pid": os.getpid(),
               "umask": _umask()}
    child: list[int] = []  # the fork's pid, once the server has told it
    pending: list[int] = []  # signals that came before that

    def forward(signum: int, _frame) -> None:
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except OSError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    try:
        _send(sock, request, [0, 1, 2])
        reply, _ = _recv(sock)
    except (OSError, EOFError):
        sock.close()
        if pending:  # stopped before anything ran
            os._exit(128 + pending[0])
        _cold(argv)  # the server went away before it forked: nothing ran yet
    child.append(reply["pid"])
    for signum in pending:
        forward(signum, None)
    try:
        status = _recv(sock)[0]["status"]
    except (OSError, EOFError):
        try:
            os.kill(child[0], signal.SIGKILL)
        except OSError:
            pass
        print(f"error: the warm-start server died while it ran {argv[0]}; run again (CIFARCNN_WARM=0 runs "
              "every stage in a fresh interpreter)", file=sys.stderr)
        os._exit(1)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


def stop(folder: Path) -> None:
    """Stop the servers in ``folder``: each sees its socket gone, takes no more stages and exits
    within a second (a stage it is running finishes)."""
    for sock in Path(folder).glob("*.sock"):
        sock.unlink(missing_ok=True)


def _umask() -> int:
    """cifarcnn.fsutil.current_umask, which this module cannot import (it imports no project module)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- the server's side -----------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _sweep(folder: Path, key: str) -> None:
    """Remove other keys' lock, log and socket once no stage has used them for STALE_S: every new
    interpreter, package set or environment makes a key, and nothing else would ever remove its
    files. A key whose lock is held (its server is starting or running) is left alone. The same
    for package maps (:func:`_packages_file`) no server has read for STALE_S."""
    now = time.time()
    for lock_path in folder.glob("*.lock"):
        other = lock_path.stem
        if other == key:
            continue
        files = [folder / f"{other}.log", folder / f"{other}.sock", folder / f"{other}.early.sock",
                 folder / f"{other}.cold", lock_path]
        try:
            used = max(p.stat().st_mtime for p in files if p.exists())  # the log: a line per stage
            if now - used < STALE_S:
                continue
            with open(lock_path, "a") as held:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError while a server holds it
                for p in files:
                    p.unlink(missing_ok=True)
        except (OSError, ValueError):  # held, or gone meanwhile
            continue
    for packages in folder.glob("packages-*.json"):  # a package set no server has used for as long
        try:
            if now - packages.stat().st_mtime >= STALE_S:
                packages.unlink()
        except OSError:
            continue


DIST_SUFFIXES = (".dist-info", ".egg-info")  # what importlib.metadata finds a distribution by


def _packages_file(folder: Path) -> Path:
    """Where the server keeps MLflow's package map for this set of installed distributions:
    named by the import path's folders that hold one, with their mtimes. Installing, upgrading or
    removing a distribution adds or removes a *.dist-info in one of them, which changes its
    mtime, and so the name. Shared by every project copy on the same packages (each has a key of
    its own: a DVC queue's, a sweep's)."""
    stamp = []
    for entry in sys.path:
        try:
            if any(name.endswith(DIST_SUFFIXES) for name in os.listdir(entry or ".")):
                stamp.append([os.path.abspath(entry or "."), os.stat(entry or ".").st_mtime_ns])
        except OSError:
            continue
    return folder / f"packages-{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}.json"


def _import(name: str) -> None:
    module = importlib.import_module(name)
    if name == "matplotlib":
        module.use("Agg")  # what cifarcnn.figures sets (stages are headless), before pyplot is imported


def _mlflow_schema_head() -> None:
    """MLflow checks every new client's store against the newest of its schema migrations, which
    it finds by loading all 60-odd migration scripts again: 30 ms in each stage that connects (two
    clients in an evaluate stage, the tracking and the registry store's). The migrations are this
    MLflow install's (its files are part of the key), so the server finds the newest once and each
    fork asks it. MLflow names it privately: should it go, stages only look it up themselves."""
    try:
        from mlflow.store.db import utils as db_utils
        head = functools.cache(db_utils._get_latest_schema_revision)
        head()  # a failure is not cached: each stage tries, and reports it, itself
        db_utils._get_latest_schema_revision = head
    except Exception as err:  # noqa: BLE001 - the stages look it up themselves
        _log(f"MLflow's newest schema revision not found ({type(err).__name__}: {err}); each stage looks")


def _mlflow_package_map(folder: Path) -> None:
    """Build MLflow's map of installed packages to their modules, which it builds on first use in
    every process: pyfunc.log_model (the evaluate stage) checks the model's pip requirements against
    it, pyfunc.load_model too. Building it reads every installed package's file list, 0.6-1.8 s of
    CPU here, more than the rest of an evaluate stage. Built once in the server, each fork has it,
    and kept in ``folder`` (:func:`_packages_file`), so the next server on the same packages reads
    it instead. The packages it lists are those of the server's start, as for the preloaded ones.
    MLflow names it privately: should it go, stages only build it themselves again."""
    try:
        from mlflow.utils import requirements_utils as req
    except ImportError:
        return
    saved = _packages_file(folder)
    try:
        modules = json.loads(saved.read_text())
        if isinstance(modules, dict):
            req._MODULES_TO_PACKAGES = modules
            req._init_packages_to_modules_map()  # the reverse map, from it (milliseconds)
            os.utime(saved)  # in use: _sweep keeps it
            return
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    try:
        req._init_packages_to_modules_map()  # builds _MODULES_TO_PACKAGES, which is None
        tmp = saved.with_name(f"{saved.stem}.{os.getpid()}.json")  # packages-*.json: _sweep's, should it stay
        tmp.write_text(json.dumps(req._MODULES_TO_PACKAGES))
        os.replace(tmp, saved)  # whole or not at all, for a server starting beside this one
    except (OSError, TypeError, ValueError, AttributeError):
        pass


def serve(folder: Path, key: str, lock_fd: int) -> None:
    """Serve stages of ``key`` until idle; ``lock_fd``: <key>.lock, locked by the stage that
    started this server (held for this process's life: it is how stages know a server is here).

    Once torch is imported, a fork of this process (the early server) takes the EARLY stages on
    <key>.early.sock while this one imports the rest of PRELOAD; then this one takes every stage on
    <key>.sock, and the early server exits once the stages it took have ended."""
    lock = os.fdopen(lock_fd, "a")  # noqa: SIM115 - held open until this process ends
    started = time.monotonic()
    _sweep(folder, key)
    # Should anything ask torch.cuda.is_available() here, NVML answers: the CUDA driver, once
    # initialised, does not work in a fork (each stage's fork initialises its own).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    importlib.machinery.SourceFileLoader.source_to_code = _cached_source_to_code  # for the forks: see _CODE
    _import("torch")
    early = _serve_early(folder, key, lock, started)
    for name in PRELOAD:
        _import(name)
    _mlflow_package_map(folder)
    _mlflow_schema_head()
    if sys.modules["torch"].cuda.is_initialized():  # hold the lock, take no stage: they run cold meanwhile
        _log(f"torch initialised CUDA while importing: a fork could not use it; stages run cold for {IDLE_S:.0f} s")
        cold = folder / f"{key}.cold"  # so that no stage waits for this server
        cold.touch()
        try:
            if early is not None:
                os.close(early[1])
            time.sleep(IDLE_S)
        finally:
            cold.unlink(missing_ok=True)
        return
    listener, sock_path = _listen(folder / f"{key}.sock")
    _log(f"server {os.getpid()} ready in {time.monotonic() - started:.1f} s ({', '.join(PRELOAD)} imported)")
    if early is not None:
        os.close(early[1])  # the early server takes no more stages (it sees the pipe end)
    if not _serve_loop(listener, sock_path, lock, later=list(LATER), stop_fd=None, early_pid=early and early[0]):
        _log(f"server {os.getpid()} exits: idle for {IDLE_S:.0f} s")


def _listen(sock_path: Path) -> tuple[socket.socket, Path]:
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _address(sock_path, listener.bind)
    listener.listen(64)
    listener.setblocking(False)  # a server and its successor both accept on it for a moment: one gets each stage
    return listener, sock_path


def _serve_early(folder: Path, key: str, lock, started: float) -> tuple[int, int] | None:
    """Fork the early server, which takes EARLY stages while this process imports the rest; its
    pid and the pipe end whose closing tells it to stop (this process ending closes it too). None
    when torch initialised CUDA: a fork could not use it."""
    if sys.modules["torch"].cuda.is_initialized():
        return None

    def early(stop_r: int) -> None:
        listener, sock_path = _listen(folder / f"{key}.early.sock")
        _log(f"early server {os.getpid()} takes {', '.join(EARLY)} in {time.monotonic() - started:.1f} s "
             f"(torch imported) until server {os.getppid()} is ready")
        _serve_loop(listener, sock_path, lock, later=[], stop_fd=stop_r, early_pid=None)

    return _fork_server(early, "early server {pid}", fork_writes=False)


def _fork_server(body, name: str, fork_writes: bool) -> tuple[int, int]:
    """Fork a process that runs ``body`` with its end of a new pipe to this one, then ends with
    os._exit (never returning into this process's code): status 0, or 1 when ``body`` raised,
    logged as ``name`` (a format with {pid}) failed. Returns the fork's pid and this process's end
    of the pipe: the read end when the fork writes (the successor says it is ready), else the write
    end (this process tells the early server to stop by closing it)."""
    read_end, write_end = os.pipe()
    mine, theirs = (read_end, write_end) if fork_writes else (write_end, read_end)
    pid = os.fork()
    if pid:
        os.close(theirs)
        return pid, mine
    code = 1
    try:
        os.close(mine)
        body(theirs)
        code = 0
    except BaseException as err:  # noqa: BLE001 - logged; the server that forked it goes on without it
        _log(f"{name.format(pid=os.getpid())} failed: {type(err).__name__}: {err}")
    finally:
        os._exit(code)


def _serve_loop(listener: socket.socket, sock_path: Path, lock, later: list[str], stop_fd: int | None,
                early_pid: int | None) -> bool:
    """Take stages on ``listener`` (a fork each) until idle for IDLE_S with none running, or, with
    ``stop_fd`` (the early server), until that pipe ends and the stages it took have ended. With
    ``later``, a successor (a fork of this process) imports those modules meanwhile and then takes
    the stages on the same socket: this process takes none after that, and ends once the stages it
    took have ended (True: handed over). ``early_pid``: the early server (not a stage's fork)."""
    try:
        inode = sock_path.stat().st_ino
    except OSError:  # stopped meanwhile (stop(), or the server that forked this one went idle)
        return False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    if stop_fd is not None:
        sel.register(stop_fd, selectors.EVENT_READ, "stop")
    running: dict[int, tuple[socket.socket, str, float]] = {}  # fork pid -> (its stage's socket, what, start)
    # The project's modules, compiled into _CODE for the forks (the server's; its early server takes few stages)
    sources = dict.fromkeys(_sources(None, sys.path)) if stop_fd is None else {}
    successor, ready = None, None  # the successor's pid, and the pipe it says "ready" on until read
    taking = True  # the early server stops taking stages once told, a server once its successor is ready
    idle_since = time.monotonic()
    while running or (taking and (stop_fd is not None or time.monotonic() - idle_since < IDLE_S)):
        events = sel.select(timeout=2 * POLL_S if sources or later else 1.0)
        if not events and sources:  # nobody waiting: the sources (0.1 s once, then a read each), then look again
            for path in sources:
                _compile(path)
            sources.clear()
            continue
        if not events and later and taking:  # nobody waiting: LATER goes to a successor
            successor, ready = _fork_successor(listener, sock_path, lock, later,
                                               close=[wake_r, wake_w, sel, *(c for c, _, _ in running.values() if c)])
            sel.register(ready, selectors.EVENT_READ, "ready")
            later = []
            continue
        for sk, _ in sorted(events, key=lambda event: event[0].data in ("stop", "ready")):  # a stage that came: first
            if sk.data in ("stop", "ready"):  # take no more stages (the early server, or a successor ready)
                sel.unregister(sk.fileobj)
                handed = False
                if sk.data == "ready":
                    handed = os.read(ready, 1) == b"1"  # nothing: it ended without taking over
                    os.close(ready)
                    ready = None
                    _log(f"server {os.getpid()} hands its socket to server {successor}, which has LATER too" if handed
                         else f"server {successor} (LATER) ended before it was ready; server {os.getpid()} goes on")
                if sk.data == "stop" or handed:  # end with the stages running
                    sel.unregister(listener)
                    listener.close()
                    if not handed:  # the socket is the successor's now
                        _unlink_if(sock_path, inode)
                    taking = False
            elif sk.data == "accept":
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:  # its successor took that one
                    continue
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid != os.getuid():
                    conn.close()
                    continue
                try:
                    conn.settimeout(10)
                    request, fds = _recv(conn)
                    conn.settimeout(None)
                except (OSError, EOFError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    for fd in (listener.fileno(), wake_r, wake_w, conn.fileno(), lock.fileno(), stop_fd, ready):
                        if fd is not None:
                            os.close(fd)
                    for other, _, _ in running.values():
                        if other is not None:
                            os.close(other.fileno())
                    _run(request, fds)  # never returns
                for fd in fds:
                    os.close(fd)
                what = " ".join(request["argv"])
                running[pid] = (conn, what, time.monotonic())
                sel.register(conn, selectors.EVENT_READ, pid)
                _send(conn, {"pid": pid})
                if stop_fd is None:  # what the next stages will compile, as it is now (an edit: compiled again)
                    script = os.path.join(request["cwd"], request["argv"][0])  # as the fork finds it (this one runs from /)
                    sources.update(dict.fromkeys(_sources(script, request["path"])))
            elif sk.data == "child":
                while True:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        break
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    if pid in (early_pid, successor):  # not a stage's fork
                        continue
                    conn, what, began = running.pop(pid, (None, "?", time.monotonic()))
                    _log(f"{what} (pid {pid}): {_describe(status)} after {time.monotonic() - began:.1f} s")
                    if conn is not None:  # None: its stage process went first
                        sel.unregister(conn)
                        try:
                            _send(conn, {"status": status})
                        except OSError:
                            pass
                        conn.close()
            else:  # a stage's socket is readable: its process ended (EOF), so its fork must too
                try:
                    gone = not sk.fileobj.recv(1)
                except OSError:
                    gone = True
                if gone:
                    sel.unregister(sk.fileobj)
                    sk.fileobj.close()
                    running[sk.data] = (None, *running[sk.data][1:])
                    try:
                        os.kill(sk.data, signal.SIGKILL)
                    except OSError:
                        pass
                    _log(f"pid {sk.data}: its stage process is gone; SIGKILL")
        if running:
            idle_since = time.monotonic()
        if taking:
            try:
                if sock_path.stat().st_ino != inode:
                    break  # another server took the socket over
            except OSError:
                break  # the socket was removed: stop taking stages
    if taking:
        _unlink_if(sock_path, inode)
    return not taking and stop_fd is None


def _fork_successor(listener: socket.socket, sock_path: Path, lock, later: list[str], close: list) -> tuple[int, int]:
    """Fork the process that imports ``later`` while this one goes on taking stages, then takes
    them itself on the same socket (and tells this one on the pipe whose read end is returned,
    with its pid). A stage that comes meanwhile is never kept waiting by an import (torchvision's
    takes 1.5 s), and a fork taken after it has those modules."""
    def successor(ready_w: int) -> None:
        for thing in close:  # the server's loop: its selector, wake-up pipe and stages' sockets
            if isinstance(thing, int):
                os.close(thing)
            else:
                thing.close()
        signal.set_wakeup_fd(-1)
        for name in later:
            try:
                _import(name)
            except Exception as err:  # noqa: BLE001 - the stages that use it import it, and fail, themselves
                _log(f"could not import {name} ({type(err).__name__}: {err}); stages import it themselves")
        _log(f"server {os.getpid()}: {', '.join(n for n in LATER if n in sys.modules)} imported; "
             f"Python threads: {threading.active_count()}")  # 1: see PRELOAD
        try:
            os.write(ready_w, b"1")
            os.close(ready_w)
        except OSError:  # the server that forked this one is gone (idle, or stopped): so is its socket
            return
        _serve_loop(listener, sock_path, lock, later=[], stop_fd=None, early_pid=None)
        _log(f"server {os.getpid()} exits: idle for {IDLE_S:.0f} s")

    return _fork_server(successor, "server {pid} (LATER)", fork_writes=True)


def _unlink_if(sock_path: Path, inode: int) -> None:
    """Remove the socket file if it is still this server's."""
    try:
        if sock_path.stat().st_ino == inode:
            sock_path.unlink()
    except OSError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


# --- the project's code, compiled once for every fork ------------------------------------------
# A fork imports the project's modules afresh (never the server's copy), so without bytecode files
# (PYTHONDONTWRITEBYTECODE=1, as container images often set, or a read-only checkout) every stage
# compiled them again: 25 ms of a stage's imports here. The server compiles them between stages
# and its forks' import system takes a module's code from here when the source it just read is,
# byte for byte, the source compiled: an edit is a miss, compiled in the fork as before.
PACKAGE = "cifarcnn"
_CODE: dict[str, tuple[bytes, object]] = {}  # source path -> (its bytes, their code object)
_source_to_code = importlib.machinery.SourceFileLoader.source_to_code


def _compiled(data: bytes, path: str):
    entry = _CODE.get(path)
    return entry[1] if entry is not None and entry[0] == data else None


def _cached_source_to_code(self, data, path, *, _optimize=-1):
    """importlib's SourceLoader.source_to_code, from _CODE when it holds this very source."""
    code = _compiled(data, path) if _optimize == -1 and isinstance(data, bytes) else None
    return code if code is not None else _source_to_code(self, data, path, _optimize=_optimize)


def _sources(script: str | None, path: list[str]) -> list[str]:
    """What a stage's fork compiles unless _CODE has it: its script, and the project's modules
    (from the first folder of its import path that holds the package, as its imports find them)."""
    found = [os.path.abspath(script)] if script else []
    for entry in path:
        package = os.path.join(entry, PACKAGE)
        if os.path.isfile(os.path.join(package, "__init__.py")):
            try:
                found += [os.path.join(package, n) for n in sorted(os.listdir(package)) if n.endswith(".py")]
            except OSError:
                pass
            break
    return found


def _compile(path: str) -> None:
    """Compile ``path`` into _CODE as importlib would (unless it holds this source already)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if _compiled(data, path) is None:
            _CODE[path] = (data, compile(data, path, "exec", dont_inherit=True))
    except (OSError, SyntaxError, ValueError):  # gone or broken: the stage meets it, and reports it, itself
        _CODE.pop(path, None)


def _run(request: dict, fds: list[int]) -> None:
    """In the fork: become the stage the request describes, run its script, exit with its status."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_stdio(request["env"])
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["argv"][0]
        _name_process(os.path.basename(script))
        sys.argv = list(request["argv"])
        sys.path[:] = [os.path.dirname(os.path.abspath(script)), *request["path"]]
        for name in [m for m in sys.modules if m == "cifarcnn" or m.startswith("cifarcnn.")]:
            del sys.modules[name]  # the project's code comes from the stage's own path, as it is now
        importlib.invalidate_caches()
        import random
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # a fresh process draws a fresh global state too
        _disown_finalizers()
        sys.audit("cifarcnn.stage", "forked", request["pid"])  # bench/stageclock: the stage began in that pid
        os.environ[LAUNCHER_ENV] = str(request["pid"])  # errors.watch_parent watches that process's parent
        _die_with(request["pid"])
        try:
            _run_main(os.path.abspath(script))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if exit_.code is not None and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt as err:
            _traceback(err)
            _finish()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)  # as Python does: killed by SIGINT
        except BaseException as err:  # noqa: BLE001 - a script's uncaught error: its traceback, exit 1
            _traceback(err)
            code = 1
        _finish()
    except BaseException as err:  # noqa: BLE001 - setting up the fork failed (a folder gone, say): say so
        try:
            print(f"error: cifarcnn.warm could not run {request.get('argv')} ({err!r}); CIFARCNN_WARM=0 runs it "
                  "in a fresh interpreter", file=sys.stderr, flush=True)
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _disown_finalizers() -> None:
    """The server's weakref finalizers are the server's: a fork's exit does not run them (the
    stage's own still run). What they would undo is the server's state, or something of the
    server's outside it (a temporary folder, say); torch's 201, one for each `torch.library`
    registration, took 31 ms of every stage's exit, mostly copying the dispatcher's pages
    (copy-on-write). The registry is weakref's own (``finalize._registry``)."""
    import weakref
    for finalizer in list(getattr(weakref.finalize, "_registry", ())):
        finalizer.atexit = False


def _die_with(pid: int) -> None:
    """SIGKILL this fork the moment process ``pid`` (its stage process) ends, as a stage run cold
    dies with its process. The server does so too, but only between other events (a stage's
    fork, a project module's compile), and not at all while it is stopped: time enough for
    errors.watch_parent to stop the stage gently and mark its MLflow run KILLED itself, when the
    whole process tree was SIGKILLed. A pidfd, watched by a thread."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):  # no pidfd here (Linux < 5.3): the server's SIGKILL alone
        return

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="die-with-stage", daemon=True).start()


def _name_process(name: str) -> None:
    """Show the stage's script as this fork's name in top and `ps -o comm` (its argv stays the
    server's: Linux keeps that in the process's memory, which a fork shares)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _run_main(path: str) -> None:
    """Run the script at ``path`` as ``__main__``, as `python <script>` does: ``__file__`` is
    absolute and sys.argv[0] stays as given (runpy.run_path would rewrite it)."""
    import builtins
    import types
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None, __package__=None, __spec__=None,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    with open(path, "rb") as fh:
        data = fh.read()
    code = _compiled(data, path) or compile(data, path, "exec", dont_inherit=True)  # not this module's __future__
    exec(code, main.__dict__)


def _traceback(err: BaseException) -> None:
    """The traceback Python prints for an uncaught error, from the script's first frame on."""
    import traceback
    tb = err.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
                              or tb.tb_frame.f_code.co_filename.endswith("runpy.py")):
        tb = tb.tb_next
    traceback.print_exception(type(err), err, tb or err.__traceback__)


def _finish() -> None:
    """What a normal interpreter exit does that matters here: join threads, atexit, flush."""
    import atexit
    import threading
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _reopen_stdio(env: dict) -> None:
    """New sys.stdin/stdout/stderr over fds 0-2, buffered as Python would for them."""
    import io
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, name)
        try:
            old.flush()
        except (OSError, ValueError, AttributeError):
            pass
        try:
            raw = io.FileIO(fd, mode, closefd=False)
        except OSError:
            continue
        tty = raw.isatty()
        binary = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(binary, encoding=getattr(old, "encoding", None) or "utf-8",
                                  errors=getattr(old, "errors", None) or "strict",
                                  line_buffering=mode == "w" and (tty or name == "stderr"),
                                  write_through=mode == "w" and unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"] and len(argv) == 4:
        serve(Path(argv[1]), argv[2], int(argv[3]))
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m cifarcnn.warm <script> [args...]\n\n{__doc__.strip()}")
        sys.exit(0 if argv else 2)
    launch(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
