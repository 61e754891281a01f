"""cifarcnn.warm: a stage run through `python -m cifarcnn.warm <script>` behaves as `python <script>`
would (argv, folder, environment, umask, stdin/stdout/stderr, exit status, signals, tracebacks),
only without importing torch and mlflow itself once a server is up. The smoke project runs every
stage of `dvc repro` this way (tests/test_smoke.py checks the server's log)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import proc_state

from cifarcnn import warm as warm_launcher
from cifarcnn.fsutil import current_umask

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, time
warm = "torch" in sys.modules  # before anything here imports it: only a fork of the server has it
import cifarcnn.errors
print("warm" if warm else "cold", repr(sys.argv), os.getcwd(), os.environ.get("WARM_TEST"), oct(os.umask(0)),
      sys.path[0], getattr(cifarcnn.errors, "MARK", None), cifarcnn.errors.__file__, sorted(os.sched_getaffinity(0)),
      sys.modules["torch"].get_num_threads() if warm else None,
      getattr(sys.modules.get("mlflow.utils.requirements_utils"), "_MODULES_TO_PACKAGES", None) is not None, sep="|")
print("to stderr", file=sys.stderr)
what = sys.argv[1] if len(sys.argv) > 1 else ""
if what == "stdin":
    print("read", sys.stdin.read().strip())
elif what == "fail":
    raise ValueError("boom")
elif what == "exit3":
    sys.exit(3)
elif what == "sleep":
    open("pid", "w").write(str(os.getpid()))
    time.sleep(120)
elif what == "watch":  # a stage: errors.cli watches whoever started it
    @cifarcnn.errors.cli
    def main():
        open("pid", "w").write(f"{os.getpid()} {os.environ.get('CIFARCNN_WARM_LAUNCHER')}")
        time.sleep(120)
    main()
"""


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A project folder with the script, its own copy of cifarcnn (so its modules can be edited), a
    socket folder of its own, and a warm server for them."""
    base = tmp_path_factory.mktemp("warm")
    src = base / "src" / "cifarcnn"
    src.mkdir(parents=True)
    for name in ("__init__.py", "warm.py", "errors.py"):
        shutil.copy(ROOT / "src" / "cifarcnn" / name, src / name)
    work = base / "work"
    work.mkdir()
    (work / "s.py").write_text(SCRIPT)
    folder = base / "w"
    env = {**os.environ, "PYTHONPATH": str(base / "src"), "CIFARCNN_WARM_DIR": str(folder),
           "CIFARCNN_WARM_IDLE_S": "60"}
    env.pop("CIFARCNN_WARM", None)
    first = run(work, env)
    assert first.returncode == 0 and first.stdout.startswith("cold|"), first  # no server yet: it runs cold...
    _wait_for_a_server(folder)  # ...and starts one
    yield work, env, folder, src
    warm_launcher.stop(folder)  # the fixture's servers exit within a second


def run(work: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarcnn.warm", "s.py", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def _servers(folder: Path) -> set[Path]:
    """The sockets of the servers in ``folder`` (not of their early servers)."""
    return {p for p in folder.glob("*.sock") if not p.name.endswith(".early.sock")}


def _wait_for_a_server(folder: Path) -> None:
    """Until a server in ``folder`` listens (it imports for seconds; 300 s at most)."""
    deadline = time.monotonic() + 300
    while not _servers(folder):
        assert time.monotonic() < deadline, _logs(folder)
        time.sleep(0.2)


def _logs(folder: Path) -> str:
    return "".join(p.read_text() for p in folder.glob("*.log"))


# The server key a stage launched with this environment gets (cifarcnn.warm._key of its sys.path).
KEY_COMMAND = [sys.executable, "-c", "import sys; from cifarcnn.warm import _key; print(_key(sys.path[1:]))"]


def fields(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.splitlines()[0].split("|")


def test_a_stage_runs_in_a_fork_with_its_own_argv_folder_environment_umask_and_streams(warm):
    work, env, folder, src = warm
    proc = run(work, {**env, "WARM_TEST": "x y"}, "stdin", "two words", input="from stdin\n")
    assert proc.returncode == 0, proc
    mode, argv, cwd, var, umask, path0, _, module, _, _, package_map = fields(proc)
    assert mode == "warm", _logs(folder)
    assert argv == repr(["s.py", "stdin", "two words"]) and cwd == str(work) and var == "x y"
    assert umask == oct(current_umask())
    assert path0 == str(work)  # the script's folder first, as `python s.py` has it
    assert module == str(src / "errors.py")  # the project's modules from the stage's own path
    assert proc.stdout.splitlines()[1] == "read from stdin" and proc.stderr == "to stderr\n"
    assert package_map == "True"  # MLflow's, built by the server: log_model in the fork skips 1.8 s
    proc = subprocess.run(["sh", "-c", "umask 077 && exec \"$0\" -m cifarcnn.warm s.py", sys.executable],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert fields(proc)[0] == "warm" and fields(proc)[4] == oct(0o077)
    assert "s.py stdin two words (pid " in _logs(folder) and ": exit 0 after" in _logs(folder)


def test_the_server_imports_what_no_train_stage_needs_between_stages(warm):
    """The server takes stages once torch and MLflow are imported; torchvision, pyplot,
    scipy.stats and tabulate (2.5-3 s) a successor imports after that (a fork of the server, while
    the server goes on taking stages), which then takes the stages on the same socket: the server
    ends, and a fork taken after that has them. Nothing it imports starts a Python thread: a fork
    has only the thread that called fork(), so a lock (a logging handler's, a queue's) another
    thread held at that moment would stay locked in every stage. (The native threads of torch's
    and jemalloc's pools are theirs to handle, with pthread_atfork.)"""
    work, env, folder, _ = warm
    key = subprocess.run(KEY_COMMAND, env=env, cwd=work, capture_output=True, text=True, timeout=60).stdout.strip()
    log = folder / f"{key}.log"  # the fixture's server's
    deadline = time.monotonic() + 300
    while not (handed := re.search(r"server (\d+) hands its socket to server (\d+),", log.read_text())):
        assert time.monotonic() < deadline, _logs(folder)
        time.sleep(0.2)
    server, successor = int(handed[1]), int(handed[2])
    assert f"server {successor}: {', '.join(warm_launcher.LATER)} imported; Python threads: 1\n" in log.read_text(), \
        _logs(folder)
    while proc_state(server) not in ("gone", "Z"):  # it ran no stage: it ends at once
        assert time.monotonic() < deadline, (proc_state(server), _logs(folder))
        time.sleep(0.1)
    (work / "later.py").write_text("import os, sys\nprint(os.getppid(), *(name in sys.modules for name in sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-m", "cifarcnn.warm", "later.py", "torch", *warm_launcher.LATER], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == [str(successor)] + ["True"] * (1 + len(warm_launcher.LATER)), \
        (proc, _logs(folder))
    assert not set(warm_launcher.LATER) & set(warm_launcher.PRELOAD)


def test_a_successor_that_dies_leaves_the_server_taking_stages(tmp_path):
    """Should the successor die while it imports LATER (a module that ends its process, say), the
    server says so and goes on taking every stage itself, without LATER."""
    src = tmp_path / "src" / "cifarcnn"
    src.mkdir(parents=True)
    shutil.copy(ROOT / "src" / "cifarcnn" / "__init__.py", src / "__init__.py")
    text = (ROOT / "src" / "cifarcnn" / "warm.py").read_text()
    text, n = re.subn(r"(?m)^LATER = \(.*?\)\n", 'LATER = ("zz_ends_its_process",)\n', text, flags=re.S)
    assert n == 1
    (src / "warm.py").write_text(text)
    (tmp_path / "src" / "zz_ends_its_process.py").write_text("import os\nos._exit(3)\n")
    work, folder = tmp_path / "work", tmp_path / "w"
    work.mkdir()
    (work / "t.py").write_text("import os, sys\nprint('torch' in sys.modules, os.getppid(), 'zz_ends_its_process' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "CIFARCNN_WARM_DIR": str(folder), "CIFARCNN_WARM_IDLE_S": "60"}
    env.pop("CIFARCNN_WARM", None)

    def stage() -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "cifarcnn.warm", "t.py"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (proc, _logs(folder))
        return proc.stdout.split()

    try:
        assert stage()[0] == "False"  # cold: it starts the server
        deadline = time.monotonic() + 300
        while not (ended := re.search(r"\(LATER\) ended before it was ready; server (\d+) goes on", _logs(folder))):
            assert time.monotonic() < deadline, _logs(folder)
            time.sleep(0.2)
        assert stage() == ["True", ended[1], "False"], _logs(folder)  # the server's own fork, without LATER
        assert "hands its socket" not in _logs(folder)
    finally:
        warm_launcher.stop(folder)


FINALIZERS = """
import sys, weakref
class Thing:
    pass
thing = Thing()
weakref.finalize(thing, print, "the stage's own finalizer ran")
print("torch" in sys.modules, len(weakref.finalize._registry), sum(f.atexit for f in weakref.finalize._registry))
"""


def test_a_fork_runs_its_own_finalizers_at_exit_not_the_servers(warm):
    """A forked stage's exit runs the weakref finalizers the stage made, as a fresh interpreter
    would, and none of the server's (torch's 201 `torch.library` ones cost 31 ms of every exit;
    another could remove something of the server's)."""
    work, env, folder, _ = warm
    (work / "finalizers.py").write_text(FINALIZERS)
    proc = subprocess.run([sys.executable, "-m", "cifarcnn.warm", "finalizers.py"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc, _logs(folder))
    warm_fork, registered, at_exit = proc.stdout.splitlines()[0].split()
    assert warm_fork == "True" and int(registered) > 100, (proc.stdout, _logs(folder))  # torch's, in the server
    assert at_exit == "1"  # the stage's own
    assert proc.stdout.splitlines()[1:] == ["the stage's own finalizer ran"]


IMPORTED = ("import runpy, sys\n"
            "for script in sys.argv[2:]:\n"
            "    runpy.run_path(script, run_name='imported')  # its imports and definitions, not main\n"
            "print(*sorted(m for m in sys.argv[1].split(',') if m in sys.modules))\n")


@pytest.mark.parametrize("scripts, modules, why", [
    (["code", "source", "download", "configure", "split", "train"], warm_launcher.LATER,
     "the server takes stages before it has imported LATER"),
    ([name.removesuffix(".py") for name in warm_launcher.EARLY], [m for m in warm_launcher.PRELOAD if m != "torch"],
     "the early server has imported torch alone"),
])
def test_what_a_stage_imports_is_there_before_it_comes(scripts, modules, why):
    """Why the server may take stages before LATER is imported, and its early server the EARLY
    ones with torch alone: the scripts a `dvc repro` from scratch runs before its first evaluate
    stage, imported as a stage imports them, import nothing of LATER (building task4a's ResNet18
    imports torchvision, when that stage runs), and the EARLY ones nothing of PRELOAD but torch."""
    proc = subprocess.run([sys.executable, "-c", IMPORTED, ",".join(modules), *(f"stages/{n}.py" for n in scripts)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == [], (why, proc)
    assert "torchvision" in warm_launcher.LATER and "mlflow" in warm_launcher.PRELOAD
    assert set(warm_launcher.EARLY) <= {p.name for p in (ROOT / "stages").glob("*.py")}


EARLY_SCRIPT = ("import os, sys\n"
                "print(*(name in sys.modules for name in ('torch', 'mlflow')), os.getppid())\n")


def test_the_early_server_takes_the_data_stages_while_the_server_imports_the_rest(tmp_path):
    """A new server's first seconds: once torch is imported, its early server (a fork of it) runs
    the EARLY stages (the data stages, which a `dvc repro` from scratch runs first), while any
    other stage waits for the server itself, which then has MLflow too. Once the server is ready
    the early server exits, and the server takes every stage."""
    folder, work = tmp_path / "w", tmp_path / "work"
    work.mkdir()
    for name in ("download.py", "other.py"):
        (work / name).write_text(EARLY_SCRIPT)
    env = {**os.environ, "CIFARCNN_WARM_DIR": str(folder), "CIFARCNN_WARM_IDLE_S": "60"}
    env.pop("CIFARCNN_WARM", None)

    def launch(script: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cifarcnn.warm", script], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(proc: subprocess.Popen) -> list[str]:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (out, err, _logs(folder))
        return out.split()

    try:
        assert result(launch("download.py"))[:2] == ["False", "False"], _logs(folder)  # cold: it starts the server
        other = launch("other.py")  # waits for the server
        early = result(launch("download.py"))
        assert early[:2] == ["True", "False"], _logs(folder)  # torch, not mlflow: a fork of the early server
        assert result(other)[:2] == ["True", "True"], _logs(folder)  # a fork of the server
        log = _logs(folder)
        assert f"early server {early[2]} takes {', '.join(warm_launcher.EARLY)} in " in log, log
        assert log.index("download.py (pid") < log.index(" ready in "), log  # it ran before the server was ready
        deadline = time.monotonic() + 60
        while list(folder.glob("*.early.sock")) or proc_state(int(early[2])) not in ("gone", "Z"):
            assert time.monotonic() < deadline, (_logs(folder), proc_state(int(early[2])))
            time.sleep(0.1)
        assert result(launch("download.py"))[:2] == ["True", "True"]  # the server's own fork now
    finally:
        warm_launcher.stop(folder)


def test_other_thread_settings_or_cpus_get_a_server_of_their_own(warm):
    """torch sizes its thread pool when it is imported, from OMP_NUM_THREADS and the CPUs the
    process may use, and a fork keeps its server's pool. So a stage with another OMP_NUM_THREADS
    runs cold and starts a server of its own, whose forks then have torch's threads as a fresh
    `python <script>` would; and a CPU binding (`taskset -c 0`, a job's) makes another key too."""
    work, env, folder, _ = warm
    other = {**env, "OMP_NUM_THREADS": "2" if env.get("OMP_NUM_THREADS") == "1" else "1"}
    assert fresh_threads(other, None) == other["OMP_NUM_THREADS"]  # what a fresh interpreter has
    servers = _servers(folder)
    first = run(work, other)
    assert fields(first)[0] == "cold", _logs(folder)  # not a fork of the fixture's server
    deadline = time.monotonic() + 300
    while _servers(folder) == servers:
        assert time.monotonic() < deadline, _logs(folder)
        time.sleep(0.2)
    again = run(work, other)
    assert fields(again)[0] == "warm" and fields(again)[9] == other["OMP_NUM_THREADS"], (fields(again), _logs(folder))
    back = run(work, env)  # the fixture's server, as it was
    assert fields(back)[0] == "warm" and fields(back)[9] == fresh_threads(env, None)

    assert len(os.sched_getaffinity(0)) >= 2, "the CPU-binding case needs a machine with 2 CPUs or more"
    keys = [subprocess.run(KEY_COMMAND, env=env, preexec_fn=preexec, capture_output=True, text=True, timeout=60).stdout
            for preexec in (None, None, lambda: os.sched_setaffinity(0, {0}))]
    assert keys[0] and keys[0] == keys[1] != keys[2], keys
    assert fresh_threads(env, lambda: os.sched_setaffinity(0, {0})) == "1"  # which a fork of the first would not have


def fresh_threads(env: dict, preexec) -> str:
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                          preexec_fn=preexec, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc
    return proc.stdout.strip()


def test_an_edited_project_module_is_never_served_stale(warm):
    work, env, _, src = warm
    errors = src / "errors.py"
    before = errors.read_text()
    try:
        errors.write_text(before + "\nMARK = 'edited'\n")
        proc = run(work, env)
        assert fields(proc)[0] == "warm" and fields(proc)[6] == "edited"
    finally:
        errors.write_text(before)
    assert fields(run(work, env))[6] == "None"


COMPILED = """
import sys
compiled = []  # the project's source files this process compiles (the audit event of compile())
sys.addaudithook(lambda event, args: compiled.append(args[1].rsplit("/", 1)[1])
                 if event == "compile" and isinstance(args[1], str) and "/src/cifarcnn/" in args[1] else None)
import cifarcnn.errors
def f(x: int) -> None:
    pass
print(getattr(cifarcnn.errors, "MARK", None), ",".join(sorted(compiled)), f.__annotations__["x"].__name__)
"""


def test_the_server_compiles_the_projects_modules_for_its_forks_and_an_edit_is_compiled_afresh(warm):
    """Without bytecode files (PYTHONDONTWRITEBYTECODE, as here) every fork compiled the project's
    modules again; the server compiles them between stages, and a fork uses that code only for the
    very source it reads: an edited module is compiled in the fork, as it is now. The script itself
    compiles as `python <script>` compiles it (not with cifarcnn.warm's own `from __future__
    import annotations`: its annotations are the objects)."""
    work, env, _, src = warm
    (work / "compiled.py").write_text(COMPILED)
    env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}

    def stage() -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "cifarcnn.warm", "compiled.py"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc
        return proc.stdout.split()

    deadline = time.monotonic() + 60
    while (out := stage()) != ["None", "int"]:  # [MARK, the files it compiled, if any, ...]
        assert time.monotonic() < deadline, out  # the server compiles once it has seen a stage, between stages
        time.sleep(0.2)
    errors = src / "errors.py"
    before = errors.read_text()
    try:
        errors.write_text(before + "\nMARK = 'edited'\n")
        assert stage() == ["edited", "errors.py", "int"]  # compiled here, from the edited source
    finally:
        errors.write_text(before)
    assert stage()[0] == "None"


def test_exit_status_and_traceback_are_the_scripts(warm):
    work, env, _, _ = warm
    failed = run(work, env, "fail")
    assert failed.returncode == 1 and fields(failed)[0] == "warm"
    lines = failed.stderr.splitlines()
    assert lines[1] == "Traceback (most recent call last):" and lines[2].startswith(f'  File "{work / "s.py"}"'), \
        failed.stderr  # from the script's own frame, as Python prints it: nothing of the launcher
    assert lines[-1] == "ValueError: boom" and "warm.py" not in failed.stderr
    assert run(work, env, "exit3").returncode == 3


def _sleeping_stage(work: Path, env: dict, folder: Path, deadline: float) -> tuple[subprocess.Popen, int]:
    """A stage (s.py sleep) launched through the server: the process DVC would have started, and
    its fork's pid once the fork runs the script (before ``deadline``, time.monotonic())."""
    (work / "pid").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "cifarcnn.warm", "s.py", "sleep"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (work / "pid").exists() or not (work / "pid").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, _logs(folder)
        time.sleep(0.05)
    return proc, int((work / "pid").read_text())


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL", "fork SIGTERM", "fork SIGKILL"])
def test_signals_reach_the_fork_and_its_end_is_the_stages(warm, how):
    """Ctrl-C and kill on the process DVC started reach the fork; a fork killed by a signal ends
    that process with the same signal; and if that process is SIGKILLed, so is the fork."""
    work, env, folder, _ = warm
    deadline = time.monotonic() + 60
    proc, fork = _sleeping_stage(work, env, folder, deadline)
    assert fork != proc.pid and Path(f"/proc/{fork}/comm").read_text() == "s.py\n"  # its name in top
    signum = getattr(signal, how.split()[-1])
    os.kill(fork if how.startswith("fork") else proc.pid, signum)
    assert proc.wait(timeout=60) == -signum
    while Path(f"/proc/{fork}").exists() and proc_state(fork) != "Z":
        assert time.monotonic() < deadline, f"the fork {fork} outlived {how}"
        time.sleep(0.05)
    if how == "SIGINT":
        assert proc.stderr.read().rstrip().endswith("KeyboardInterrupt")


def test_a_fork_dies_with_its_stage_process_while_the_server_is_busy(warm):
    """SIGKILL of the process DVC started kills its fork at once even while the server takes no
    event (here stopped; busy, it takes none either): the fork watches that process
    itself. Otherwise errors.watch_parent, a second later, would stop the stage gently, and a
    whole process tree SIGKILLed (a lost Ray node) would leave a run marked KILLED by the stage."""
    work, env, folder, _ = warm
    proc, fork = _sleeping_stage(work, env, folder, time.monotonic() + 60)
    server = int(Path(f"/proc/{fork}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the fork's parent
    os.kill(server, signal.SIGSTOP)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 2  # the watch_parent poll is 1 s: well before it
        while proc_state(fork) not in ("gone", "Z"):
            assert time.monotonic() < deadline, f"the fork {fork} outlived its stage process ({proc_state(fork)})"
            time.sleep(0.02)
    finally:
        os.kill(server, signal.SIGCONT)
    assert "stopping" not in proc.stderr.read()  # not watch_parent's gentle stop


def test_a_forked_stage_stops_when_whoever_started_it_is_gone(warm, tmp_path):
    """errors.watch_parent in a fork watches the parent of the process DVC started (here a shell),
    not the server: kill -9 the shell and the stage stops on its own, saying why."""
    work, env, folder, _ = warm
    (work / "pid").unlink(missing_ok=True)
    err = tmp_path / "stderr"
    with open(err, "w") as fh:
        shell = subprocess.Popen(["sh", "-c", f"{sys.executable} -m cifarcnn.warm s.py watch; true"], cwd=work,
                                 env=env, stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.monotonic() + 60
    while not (work / "pid").exists() or not (work / "pid").read_text():
        assert time.monotonic() < deadline and shell.poll() is None, _logs(folder)
        time.sleep(0.05)
    fork, launcher = (work / "pid").read_text().split()
    fork = int(fork)
    assert launcher == "None"  # watch_parent took it out: nothing the stage starts inherits it
    os.kill(shell.pid, signal.SIGKILL)
    shell.wait()
    while Path(f"/proc/{fork}").exists() and proc_state(fork) != "Z":
        assert time.monotonic() < deadline, f"the fork {fork} outlived the shell that started its stage"
        time.sleep(0.1)
    assert f"error: the process that started this stage (pid {shell.pid}) is gone; stopping" in err.read_text()
    assert "error: stopped by SIGTERM" in err.read_text()


def test_the_launchers_variable_is_the_one_errors_reads():
    from cifarcnn import errors, warm

    assert warm.LAUNCHER_ENV == errors.LAUNCHER_ENV


def test_cold_when_switched_off_or_the_folder_is_not_private(warm, tmp_path):
    work, env, _, _ = warm
    assert fields(run(work, {**env, "CIFARCNN_WARM": "0"}))[0] == "cold"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # others could reach a socket here
    proc = run(work, {**env, "CIFARCNN_WARM_DIR": str(shared)})
    assert proc.returncode == 0 and fields(proc)[0] == "cold"
    time.sleep(1)
    assert not list(shared.iterdir()), "no server is started where others could connect to it"


def test_a_relative_folder_deeper_than_a_socket_address_still_runs_warm(warm, tmp_path):
    """A CIFARCNN_WARM_DIR relative to the stage's folder, whose sockets' paths are longer than a
    Unix socket's address (108 bytes): the server (which runs from "/") listens in that folder, and
    the next stage runs as its fork."""
    work, env, _, _ = warm
    relative = Path("d" * 60, "e" * 60)
    folder = work / relative
    env = {**env, "CIFARCNN_WARM_DIR": str(relative)}
    try:
        assert fields(run(work, env))[0] == "cold"
        _wait_for_a_server(folder)
        assert min(len(str(p)) for p in _servers(folder)) > warm_launcher.SUN_PATH
        assert fields(run(work, env))[0] == "warm", _logs(folder)
    finally:
        warm_launcher.stop(folder)


def test_a_stage_that_comes_while_the_server_starts_waits_for_it(warm, tmp_path):
    """The first stage of a run starts a server and runs cold; the next one, while that server is
    still importing torch and mlflow, waits for it and runs as its fork, instead of importing them
    a second time. Nothing waits for a server that is gone, or for one that takes no stage
    (<key>.cold: torch initialised CUDA while importing)."""
    import fcntl

    work, env, _, _ = warm
    folder = tmp_path / "fresh"
    folder.mkdir(mode=0o700)
    env = {**env, "CIFARCNN_WARM_DIR": str(folder)}
    try:
        first = run(work, env)
        assert fields(first)[0] == "cold" and not _servers(folder), _logs(folder)  # still importing
        second = run(work, env)
        assert fields(second)[0] == "warm", _logs(folder)
        assert _logs(folder).count(" ready in ") == 1, _logs(folder)  # one server, and the second stage its fork
    finally:
        warm_launcher.stop(folder)

    # Ctrl-C while it waits: the stage ends at once with SIGINT's status, no traceback, nothing ran.
    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o700)
    key = subprocess.run(KEY_COMMAND, env=env, cwd=work, capture_output=True, text=True, timeout=60).stdout.strip()
    with open(blocked / f"{key}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a server of that key, still importing
        proc = subprocess.Popen([sys.executable, "-m", "cifarcnn.warm", "s.py"], cwd=work,
                                env={**env, "CIFARCNN_WARM_DIR": str(blocked)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None  # waiting for that server
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (128 + signal.SIGINT, "", "")

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    started = time.monotonic()
    assert warm_launcher._wait_for_server(empty, "k") is None  # no server holds the lock
    with open(empty / "k.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a server of that key would
        (empty / "k.cold").touch()
        assert warm_launcher._wait_for_server(empty, "k") is None
    assert time.monotonic() - started < 5  # not WAIT_S


def test_the_server_exits_when_idle_and_sweeps_other_keys_old_files(warm, tmp_path):
    """The server exits after CIFARCNN_WARM_IDLE_S; starting, it removed the files of other keys
    unused for 7 days, but not those of a key used since or whose lock a server holds."""
    import fcntl

    work, env, _, _ = warm
    folder = tmp_path / "idle"
    folder.mkdir(mode=0o700)
    old = time.time() - 8 * 86400
    for other in ("stale", "recent", "held"):
        for suffix in (".lock", ".log"):
            (folder / f"{other}{suffix}").write_text("")
            os.utime(folder / f"{other}{suffix}", (old, old))
    os.utime(folder / "recent.log")  # a stage ran under that key lately: its log is new, its lock is not
    for name, when in (("packages-stale.json", old), ("packages-recent.json", time.time() - 86400)):
        (folder / name).write_text("{}")
        os.utime(folder / name, (when, when))
    env = {**env, "CIFARCNN_WARM_DIR": str(folder), "CIFARCNN_WARM_IDLE_S": "1"}
    with open(folder / "held.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a server of that key would
        assert fields(run(work, env))[0] == "cold"
        deadline = time.monotonic() + 300
        while "exits: idle for 1 s" not in _logs(folder):
            assert time.monotonic() < deadline, _logs(folder)
            time.sleep(0.2)
    assert not list(folder.glob("*.sock")) and "ready in" in _logs(folder)
    left = {p.name for p in folder.iterdir()}
    assert not {"stale.lock", "stale.log", "packages-stale.json"} & left, left
    assert {"recent.lock", "recent.log", "held.lock", "held.log", "packages-recent.json"} <= left, left


def test_mlflows_package_map_is_kept_until_a_package_is_installed(tmp_path, monkeypatch):
    """The server's map of installed packages (what MLflow checks a logged model's requirements
    against) is read from the socket folder instead of built again, by every server on the same
    packages, until a distribution is installed or removed in a folder on the import path."""
    from mlflow.utils import requirements_utils as req

    site = tmp_path / "site"
    (site / "empty-0.dist-info").mkdir(parents=True)  # a folder on the path that holds distributions
    monkeypatch.syspath_prepend(str(site))
    folder = tmp_path / "w"
    folder.mkdir()

    def build() -> dict:
        monkeypatch.setattr(req, "_MODULES_TO_PACKAGES", None)
        monkeypatch.setattr(req, "_PACKAGES_TO_MODULES", None)
        warm_launcher._mlflow_package_map(folder)
        return req._MODULES_TO_PACKAGES

    first = build()
    [saved] = folder.glob("packages-*.json")
    assert "mlflow" in first["mlflow"] and json.loads(saved.read_text()) == first
    assert set(req._PACKAGES_TO_MODULES) == {p for packages in first.values() for p in packages}  # its reverse
    # What the file says is what the next server uses: mark it, and the mark comes back.
    saved.write_text(json.dumps({**first, "marked_module": ["marked-package"]}))
    assert build()["marked_module"] == ["marked-package"] and req._PACKAGES_TO_MODULES["marked-package"] == "marked_module"

    time.sleep(0.05)  # a folder's mtime ticks at the kernel's clock resolution (a few ms)
    dist = site / "newpkg-1.0.dist-info"  # `pip install newpkg`, as pip leaves it
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: newpkg\nVersion: 1.0\n")
    (dist / "top_level.txt").write_text("newmod\n")
    rebuilt = build()
    assert rebuilt["newmod"] == ["newpkg"] and "marked_module" not in rebuilt
    assert len(list(folder.glob("packages-*.json"))) == 2  # the new set's own; the old one waits for _sweep


def test_every_dvc_stage_runs_through_the_launcher():
    import yaml

    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        cmd = stage.get("do", stage)["cmd"]
        assert cmd.startswith(f"python -m cifarcnn.warm stages/{name}.py"), (name, cmd)
