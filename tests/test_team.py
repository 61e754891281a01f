"""The team stack end to end, as docs/team.md runs it: PostgreSQL, SeaweedFS (S3) and
`mlflow server` with basic auth on free loopback ports (cifarcnn.teamstack); the tiny pipeline
logging to it through a server restart; a DVC remote on the same store (push with the store
down, push, fresh clone, pull, nothing to re-run); a queued sweep of three with two workers
through a database restart. Everything it starts is stopped by PID at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fixtures import tiny_project
from helpers import eval_dir, merged, proc_state, ran_stages, sh, start_queue, train_dir, wait_for_queue

from cifarcnn import warm as warm_launcher
from cifarcnn.teamstack import Stack, _alive, _group_alive, _holders, _port_free, _terminate, _write_internal_certs, free_port

pytestmark = pytest.mark.smoke
EXPERIMENT = "cifar10-cnn-report"
# The smoke test runs every run; here a plain one, the registered one (task3e, also the sweep's) and
# task4a, the longest, during whose training the server is restarted.
RUNS = ["task2", "task3e", "task4a"]
MEASURED: dict[str, float] = {}  # printed at the end: what the closing note quotes


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The stack (in a folder the postgres user can enter) and the tiny project logging to it."""
    base = Path(tempfile.mkdtemp(prefix="cifarcnn-team-"))
    os.chmod(base, 0o755)  # PostgreSQL runs as the postgres user when the tests run as root
    # Secrets as a team might choose them: "%" (configparser), "@", ":" and "/" (URIs), a leading "-" (argv)
    odd = {"TEAM_PG_PASSWORD": "-pg%2F@:/x" + os.urandom(4).hex(), "TEAM_MLFLOW_PASSWORD": "-ml%s@:/y" + os.urandom(4).hex(),
           "TEAM_S3_SECRET_KEY": "-s3%@/#z" + os.urandom(8).hex()}
    # HTTPS for MLflow and S3 with a team certificate for 127.0.0.1 from the team's own CA: every
    # test below goes through it. Clients trust that CA: MLflow by MLFLOW_TRACKING_SERVER_CERT_PATH
    # (client_env), DVC by its remote's ssl_verify, Python's urllib here by SSL_CERT_FILE.
    certs = base / "team-certificate"
    certs.mkdir()
    _write_internal_certs(certs, "127.0.0.1")
    odd.update(TEAM_TLS_CERT=str(certs / "node.crt"), TEAM_TLS_KEY=str(certs / "node.key"),
               TEAM_TLS_CA=str(certs / "ca.crt"), SSL_CERT_FILE=str(certs / "ca.crt"))
    saved = {k: os.environ.get(k) for k in (*odd, "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                            "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_SERVER_CERT_PATH")}
    os.environ.update(odd)
    stack = Stack(base / ".team")
    try:
        started = time.monotonic()
        state = stack.start()
        MEASURED["stack_start_s"] = round(time.monotonic() - started, 1)
        MEASURED.update({f"start_{k}_s": v for k, v in state["seconds"].items()})
        os.environ.update(stack.client_env())  # this process's MlflowClient reads the server and credentials here
        with tiny_project(tmp_path_factory.mktemp("team"), runs=RUNS) as (repo, env):
            env = {**env, **stack.client_env()}
            yield stack, repo, env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        pids = list(stack.state()["pids"].values()) if stack.state_file.exists() else []
        stack.stop()
        leftover = [pid for pid in pids if _running(pid)]
        shutil.rmtree(base, ignore_errors=True)
        print(f"\nteam stack measurements: {json.dumps(MEASURED)}")
        assert not leftover, f"still running after stop: {leftover}"


def _running(pid: int) -> bool:
    """The process has not ended: reaped if it is this process's child, and not a zombie of
    another's (a service's daemonised process, reparented to PID 1, stays one until PID 1 reaps it:
    it holds no file or port any more)."""
    return _alive(pid) and proc_state(pid) not in ("Z", "gone")


def client():
    """A client on the team server (named explicitly: earlier tests in this process have set
    mlflow's global tracking URI to their own stores); the credentials come from the environment."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def experiment_runs(name: str = EXPERIMENT) -> list:
    exp = client().get_experiment_by_name(name)
    return client().search_runs([exp.experiment_id], max_results=1000) if exp else []


def test_stack_refuses_requests_without_credentials(team):
    stack, _, _ = team
    state = stack.state()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{state['mlflow_uri']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert err.value.code == 401
    import boto3
    import botocore
    from botocore.config import Config

    anonymous = boto3.client("s3", endpoint_url=state["s3_url"], region_name="us-east-1", verify=stack.ca_bundle(),
                             config=Config(signature_version=botocore.UNSIGNED))
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        anonymous.list_objects_v2(Bucket="mlflow")
    secrets = (stack.dir / "secrets.env").read_text()
    assert oct(os.stat(stack.dir / "secrets.env").st_mode & 0o777) == "0o600"
    assert f"TEAM_S3_ACCESS_KEY={stack.secrets()['TEAM_S3_ACCESS_KEY']}" in secrets  # generated: kept
    assert os.environ["TEAM_MLFLOW_PASSWORD"] not in secrets  # from the environment: never written down
    assert os.environ["TEAM_MLFLOW_PASSWORD"] not in (stack.dir / "logs" / "mlflow.log").read_text()


def _anonymous(host: str, port: int, method: str, path: str, tls: bool = False) -> int | None:
    """The HTTP status an anonymous request gets (no credentials, no client certificate); None
    when the port does not answer it as HTTP (a TLS handshake refused, a closed connection)."""
    import http.client
    import ssl

    try:
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(host, port, timeout=5, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request(method, path, body=b"tampered" if method in ("POST", "PUT") else None)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _tls_session(host: str, port: int, folder: Path | None) -> bool:
    """Whether a TLS session on ``port`` stays open (the server waits for a request) when the
    client presents the stack's certificate from ``folder`` (None: no certificate)."""
    import socket
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    if folder is not None:
        context.load_cert_chain(folder / "node.crt", folder / "node.key")
    try:
        with socket.create_connection((host, port), timeout=3) as raw, context.wrap_socket(raw) as tls:
            tls.settimeout(1.5)
            try:
                return tls.recv(1) != b""  # data (an HTTP/2 SETTINGS frame): the session is up
            except TimeoutError:
                return True  # quiet: the server waits for the request
    except (OSError, ssl.SSLError):
        return False


def test_every_port_refuses_anonymous_reads_and_writes(team):
    """Every port the stack listens on, asked without credentials: GET (a listing and a known
    object), POST, PUT and DELETE, over HTTP and over TLS without a client certificate. Only
    MLflow's /health and its static UI answer 2xx; SeaweedFS's master, volume and filer ports
    (HTTP and gRPC) want the stack's client certificate, S3 wants the keys, PostgreSQL speaks
    its own protocol. The known object is still intact afterwards."""
    stack, _, _ = team
    state = stack.state()
    s3 = stack._s3(state)
    s3.put_object(Bucket="mlflow", Key="probe/model.txt", Body=b"original")
    paths = ["/", "/buckets/mlflow/", "/buckets/mlflow/probe/model.txt", "/mlflow/probe/model.txt", "/dir/status",
             "/api/2.0/mlflow/experiments/search?max_results=1", "/api/2.0/mlflow/runs/create"]
    answered = []
    for name, port in state["ports"].items():
        for tls in (False, True):
            for method in ("GET", "POST", "PUT", "DELETE"):
                for path in (paths if method == "GET" else paths[2:4] + paths[-1:]):
                    status = _anonymous(stack.host, port, method, path, tls)
                    public = name == "mlflow" and method == "GET" and path == "/"  # the UI's page
                    if status is not None and 200 <= status < 300 and not public:
                        answered.append(f"{name}:{port} {'https' if tls else 'http'} {method} {path} -> {status}")
    assert not answered, answered
    assert _anonymous(stack.host, state["ports"]["mlflow"], "GET", "/health", tls=bool(stack.ca_bundle())) == 200
    for name in ("mlflow", "s3"):  # HTTPS only: the plain port answers no request with 2xx (checked above)
        assert _tls_session(stack.host, state["ports"][name], None) == bool(stack.ca_bundle()), name
    for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc"):
        port = state["ports"][name]  # mutual TLS: up with the stack's certificate, refused without one
        assert _tls_session(stack.host, port, stack.dir / "tls") and not _tls_session(stack.host, port, None), name
    assert s3.get_object(Bucket="mlflow", Key="probe/model.txt")["Body"].read() == b"original"
    security = stack.dir / "tls" / "security.toml"
    assert oct(os.stat(stack.dir / "tls" / "node.key").st_mode & 0o777) == "0o600" and security.exists()


def test_named_users_read_edit_and_never_manage_users(team, monkeypatch):
    """`python -m cifarcnn.teamstack user add NAME --permission read|edit` (the password from
    TEAM_USER_PASSWORD, never argv): a reader browses but cannot log, an editor logs runs to
    the project's experiment, neither can create users; `user list` shows them, and a removed
    user is refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    stack, _, env = team
    uri = stack.state()["mlflow_uri"]
    cli = [sys.executable, "-m", "cifarcnn.teamstack", "--dir", str(stack.dir), "--host", stack.host, "user"]
    passwords = {"reader": "r%@:/#" + os.urandom(4).hex(), "editor": "-e%@:/#" + os.urandom(4).hex()}
    added = sh([*cli, "add", "reader"], stack.dir.parent, {**env, "TEAM_USER_PASSWORD": passwords["reader"]})
    assert "user reader: read" in added and passwords["reader"] not in added
    sh([*cli, "add", "editor", "--permission", "edit"], stack.dir.parent, {**env, "TEAM_USER_PASSWORD": passwords["editor"]})
    generated = sh([*cli, "add", "visitor"], stack.dir.parent, env)
    assert re.search(r"password \(shown once, not stored\): \S{20,}", generated), generated
    listed = sh([*cli, "list"], stack.dir.parent, env).split()
    assert {"reader", "editor", "visitor", "admin"} <= set(listed), listed

    def as_user(name: str) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords[name])
        return MlflowClient(uri)

    exp_id = as_user("reader").get_experiment_by_name(EXPERIMENT).experiment_id
    assert as_user("reader").search_runs([exp_id], max_results=5) is not None  # browses
    with pytest.raises(MlflowException, match="(?i)permission"):
        as_user("reader").create_run(exp_id, run_name="reader-may-not")
    run = as_user("editor").create_run(exp_id, run_name="editor-logs")
    as_user("editor").log_metric(run.info.run_id, "x", 1.0)
    as_user("editor").set_terminated(run.info.run_id)
    assert as_user("reader").get_run(run.info.run_id).data.metrics["x"] == 1.0
    for name in ("reader", "editor"):
        as_user(name)
        with pytest.raises(MlflowException, match="(?i)permission"):
            AuthServiceClient(uri).create_user(f"made-by-{name}", "pw-" + os.urandom(4).hex())
    sh([*cli, "remove", "reader"], stack.dir.parent, env)
    with pytest.raises(MlflowException):
        as_user("reader").search_runs([exp_id], max_results=1)
    assert "reader" not in sh([*cli, "list"], stack.dir.parent, env).split()
    for name, secret in passwords.items():
        assert not [line for line in _all_command_lines() if secret in line], name


def _all_command_lines() -> list[str]:
    """Every process's argv, as `ps` shows it to any user on the machine."""
    lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:  # ended meanwhile
                continue
    return lines


def test_no_secret_in_any_process_argv(team):
    """`ps` shows every process's arguments to every user: no password or key may be in them."""
    stack, _, _ = team
    lines = _all_command_lines()
    assert any("mlflow server" in line for line in lines) and any("postgres -D" in line for line in lines), lines
    for name, secret in stack.secrets().items():
        leaked = [line[:120] for line in lines if secret in line]
        assert not leaked, f"{name} is in a process's argv: {leaked}"
    logs = sorted(p for p in stack.dir.rglob("*.log") if p.is_file())  # every service's log under .team/
    assert {"mlflow.log", "s3.log"} <= {p.name for p in logs}, logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [name for name, secret in stack.secrets().items() if secret in text], log


def test_dvc_remote_keys_go_to_config_local_even_when_they_look_like_options(tmp_path, monkeypatch):
    """A generated key can start with "-" (token_urlsafe); it must neither break `dvc remote
    modify` nor reach .dvc/config, and config.local must be readable by its owner only."""
    monkeypatch.setenv("TEAM_S3_SECRET_KEY", "-f1yG5dGAJZN-8vmiJbciPVakpP-TYHs")
    monkeypatch.setenv("TEAM_S3_ACCESS_KEY", "AK#%@:/x")  # "#" starts a comment in an ini file
    stack = Stack(tmp_path / ".team")
    stack.dir.mkdir()
    stack._save({"s3_url": "http://127.0.0.1:9", "mlflow_uri": "http://127.0.0.1:9", "ports": {}, "pids": {}})
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q"], repo, dict(os.environ))
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo, dict(os.environ))
    stack.configure_dvc_remote(repo)
    shared, local = (repo / ".dvc" / "config").read_text(), (repo / ".dvc" / "config.local").read_text()
    assert "-f1yG5dGAJZN-8vmiJbciPVakpP-TYHs" not in shared and "endpointurl = http://127.0.0.1:9" in shared
    assert "secret_access_key = -f1yG5dGAJZN-8vmiJbciPVakpP-TYHs" in local
    assert stack.secrets()["TEAM_S3_ACCESS_KEY"] in local
    assert oct(os.stat(repo / ".dvc" / "config.local").st_mode & 0o777) == "0o600"
    remote = sh([sys.executable, "-m", "dvc", "config", "remote.team.secret_access_key"], repo, dict(os.environ))
    assert remote.strip() == "-f1yG5dGAJZN-8vmiJbciPVakpP-TYHs"
    assert sh([sys.executable, "-m", "dvc", "config", "remote.team.access_key_id"], repo, dict(os.environ)).strip() == \
        "AK#%@:/x"


def test_a_service_this_process_started_is_gone_once_it_exits():
    """A service the stack spawned from this process stays a zombie until waited for, and
    killpg(pgid, 0) still finds it: `stop` (and each restart) used to wait out SIGTERM's and
    SIGKILL's timeouts, 10 s a service, for processes long gone. A group member that still runs
    keeps the group alive."""
    gone = subprocess.Popen(["sh", "-c", "exit 0"], start_new_session=True)
    deadline = time.monotonic() + 30
    while proc_state(gone.pid) != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(gone.pid, 0)  # still found: the case that made `stop` wait
    assert not _group_alive(gone.pid)

    # The leader exits, its child (same group) runs on: alive until that one is stopped too.
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    child = int(leader.stdout.readline())
    leader.wait()
    assert _group_alive(leader.pid) and _alive(child)
    _terminate(leader.pid, group=True)
    assert not _group_alive(leader.pid)
    assert proc_state(child) in ("gone", "Z")  # killed; its new parent reaps it


def test_ports_stay_the_same_across_starts_and_a_taken_one_is_an_error(tmp_path, monkeypatch):
    """The DVC remote's committed endpointurl and clients' MLFLOW_TRACKING_URI must survive a
    restart: the ports of the first start are kept. One that someone else holds stops `start` in
    one line naming the port, its holder and the setting to change; nothing is started or moved.
    TEAM_PORT_<NAME> moves it, and the new port is kept."""
    import cifarcnn.teamstack as teamstack

    stack = Stack(tmp_path / ".team")
    stack.dir.mkdir()
    first = stack._ports()
    assert stack._ports() == first and len(set(first.values())) == len(first)
    squatter = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])));"
         " s.listen(); print('up', flush=True); time.sleep(300)", str(first["s3"])],
        stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "up"
        monkeypatch.setenv("TEAM_STACK_DIR", str(stack.dir))
        cli = subprocess.run([sys.executable, "-m", "cifarcnn.teamstack", "start"], capture_output=True, text=True,
                             timeout=120)
        assert cli.returncode != 0
        [line] = cli.stderr.strip().splitlines()
        assert f"port {first['s3']} (s3) is taken by pid {squatter.pid} ({sys.executable} -c import socket" in line, line
        assert "set TEAM_PORT_S3 to a free port (then `python -m cifarcnn.teamstack remote` in each checkout)" in line
        assert not stack.state_file.exists() and not (stack.dir / "logs").exists()  # nothing started
        assert json.loads((stack.dir / "ports.json").read_text()) == first  # nothing moved
        moved = teamstack.free_port()
        monkeypatch.setenv("TEAM_PORT_S3", str(moved))
        assert stack._ports() == {**first, "s3": moved}
        monkeypatch.delenv("TEAM_PORT_S3")
        assert stack._ports() == {**first, "s3": moved}  # kept for the next start
        monkeypatch.setenv("TEAM_PORT_MLFLOW", str(moved))
        with pytest.raises(teamstack.UserError, match=f"port {moved} is set for both mlflow and s3|"
                                                      f"port {moved} is set for both s3 and mlflow"):
            stack._ports()
    finally:
        squatter.kill()
        squatter.wait()


def _restart_when(stack: Stack, service: str, ready, record: dict) -> threading.Thread:
    """Restart ``service`` once ``ready()`` holds (polled); notes when and how long it was away."""
    def watch():
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if ready():
                    break
            except Exception:  # noqa: BLE001 - the server may be busy; look again
                pass
            time.sleep(1)  # each look is two or three requests to the server, on the CPUs the runs train on
        else:
            return
        record["away_s"] = round(stack.restart(service), 1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _history_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, key))


def test_pipeline_logs_everything_to_the_server_through_a_restart(team):
    """`dvc repro` with MLFLOW_TRACKING_URI and credentials set; `mlflow server` is restarted
    while task4a trains: training goes on, and every metric of every run lands."""
    stack, repo, env = team
    restart: dict = {}

    def task4a_training() -> bool:
        runs = [r for r in experiment_runs() if r.data.tags.get("dvc_stage") == "train@task4a-0"
                and r.info.status == "RUNNING"]
        if runs and _history_steps(runs[0].info.run_id, "curves/train_loss"):
            restart["run_id"] = runs[0].info.run_id
            return True
        return False

    watcher = _restart_when(stack, "mlflow", task4a_training, restart)
    started = time.monotonic()
    sh(["dvc", "repro"], repo, env)
    MEASURED["repro_s"] = round(time.monotonic() - started, 1)
    watcher.join(timeout=60)
    assert "away_s" in restart, "mlflow server was not restarted while task4a trained"
    MEASURED["mlflow_restart_away_s"] = restart["away_s"]
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()  # all on the server

    runs = {r.data.tags.get("dvc_stage"): r for r in experiment_runs()}
    for name in RUNS:
        info = merged(train_dir(repo, name), "train.json", "run.json")
        evaluation = json.loads((eval_dir(repo, name) / "eval.json").read_text())
        run = runs[f"train@{name}-0"]
        assert run.info.run_id == info["mlflow_run_id"] and run.info.status == "FINISHED"
        assert _history_steps(run.info.run_id, "curves/train_loss") == list(range(1, info["steps"] + 1)), name
        assert len(_history_steps(run.info.run_id, "curves/val_acc")) == len(
            (train_dir(repo, name) / "curves.csv").read_text().splitlines()) - 1, name
        assert run.data.metrics["scores/test_acc"] == pytest.approx(evaluation["test_acc"])
    assert restart["run_id"] == runs["train@task4a-0"].info.run_id  # the run that lived through the restart
    exp = client().get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's: no checkout path in it

    # The objects are in the bucket, under the server's artifact root.
    s3 = stack._s3(stack.state())
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    models = {m.source_run_id: m.model_id for m in client().search_logged_models(experiment_ids=[exp.experiment_id])}
    for name in RUNS:
        run_id = runs[f"train@{name}-0"].info.run_id
        # one copy of the checkpoint in MLflow: inside the model the evaluate stage logged
        owned = [k for k in keys if k.endswith("best.pt") and (run_id in k or models[run_id] in k)]
        assert len(owned) == 1 and models[run_id] in owned[0], (name, owned)
        assert any(run_id in k and k.endswith("curves.png") for k in keys), name
    versions = client().search_model_versions("name = 'cifar10-task3e'")
    assert versions and versions[0].run_id == runs["train@task3e-0"].info.run_id
    MEASURED["bucket_objects"] = len(keys)


def trust_the_team_ca(clone: Path, stack: Stack, env: dict) -> None:
    """What a teammate does once in a fresh clone when the stack serves HTTPS (docs/team.md)."""
    state = stack.state()
    assert state["s3_url"].startswith("https://") and state["mlflow_uri"].startswith("https://")
    sh(["dvc", "remote", "modify", "--local", "team", "ssl_verify", stack.ca_bundle()], clone, env)


def test_dvc_remote_push_clone_pull_repro_nothing(team, tmp_path):
    """A DVC remote on the same store: push fails in one line while the store is down, works
    once it is back; a fresh clone pulls everything and `dvc repro` trains nothing."""
    stack, repo, env = team
    stack.configure_dvc_remote(repo)
    assert stack.secrets()["TEAM_S3_SECRET_KEY"] not in (repo / ".dvc" / "config").read_text()  # in config.local
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "results and the team remote"]):
        sh(args, repo, env)

    stack.stop_service("s3")
    started = time.monotonic()
    failed = sh(["dvc", "push"], repo, env, timeout=300, ok=False)
    MEASURED["push_store_down_s"] = round(time.monotonic() - started, 1)
    errors = [line for line in failed.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"Could not connect to the endpoint URL: \"{stack.state()['s3_url']}" in errors[0], failed
    stack.start_service("s3")
    started = time.monotonic()
    pushed = sh(["dvc", "push"], repo, env, timeout=300)
    MEASURED["push_s"] = round(time.monotonic() - started, 1)
    assert re.search(r"\d+ files? pushed", pushed), pushed

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    trust_the_team_ca(clone, stack, env)
    pull_env = {**env, **stack.s3_env()}  # a teammate's keys: from the environment (or config.local)
    started = time.monotonic()
    pulled = sh(["dvc", "pull"], clone, pull_env, timeout=300)
    MEASURED["pull_s"] = round(time.monotonic() - started, 1)
    assert (clone / "models" / "task3e" / "seed0" / "best.pt").read_bytes() == \
        (repo / "models" / "task3e" / "seed0" / "best.pt").read_bytes(), pulled
    again = sh(["dvc", "repro"], clone, pull_env)
    assert ran_stages(again) == ["source"], again  # the always-run source key; nothing to train


def test_queued_sweep_runs_two_at_once_through_a_database_restart(team, tmp_path):
    """`dvc exp run --queue` for three learning rates, `dvc queue start -j 2`; PostgreSQL restarts
    while they train. Every run is on the server with its lr and its whole history, and an
    experiment travels to a teammate with `dvc exp push` / `dvc exp pull` through the git remote."""
    stack, repo, env = team
    before = {r.info.run_id for r in experiment_runs()}
    rates = ["0.004", "0.005", "0.006"]
    names = [f"sweep_{i}" for i in range(len(rates))]
    for lr, name in zip(rates, names):
        sh(["dvc", "exp", "run", "--queue", "-S", f"lr={lr}", "--name", name], repo, env)
    restart: dict = {}

    def sweep_training() -> bool:
        return any(r.info.status == "RUNNING" and r.data.tags.get("dvc_stage") == "train@task3e-0"
                   for r in experiment_runs() if r.info.run_id not in before)

    watcher = _restart_when(stack, "postgres", sweep_training, restart)
    started = time.monotonic()
    start_queue(repo, env, jobs=2)
    try:
        assert wait_for_queue(repo, env, names) == dict.fromkeys(names, "Success")
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)
    MEASURED["sweep_s"] = round(time.monotonic() - started, 1)
    watcher.join(timeout=60)
    assert "away_s" in restart, "PostgreSQL was not restarted during the sweep"
    MEASURED["postgres_restart_away_s"] = restart["away_s"]

    workspace = merged(train_dir(repo, "task3e"), "train.json", "run.json")
    trained = [r for r in experiment_runs() if r.info.run_id not in before
               and r.data.tags.get("dvc_stage") == "train@task3e-0"]
    assert sorted(r.data.params["lr"] for r in trained) == ["0.004", "0.005", "0.006"]
    for run in trained:
        assert run.info.status == "FINISHED"
        assert _history_steps(run.info.run_id, "curves/train_loss") == list(range(1, workspace["steps"] + 1))
        assert "scores/test_acc" in run.data.metrics  # its evaluate stage logged too
    spans = sorted((r.info.start_time, r.info.end_time) for r in trained)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # two at once

    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    sh(["git", "remote", "add", "origin", str(origin)], repo, env)
    sh(["git", "push", "-q", "origin", "HEAD"], repo, env)
    name = trained[0].data.tags["dvc_exp_name"]
    sh(["dvc", "exp", "push", "origin", name], repo, env)  # the experiment's git ref, and its outputs to the remote
    mate = tmp_path / "teammate"
    sh(["git", "clone", "-q", str(origin), str(mate)], tmp_path, env)
    trust_the_team_ca(mate, stack, env)
    sh(["dvc", "exp", "pull", "origin", name], mate, {**env, **stack.s3_env()})
    assert name in sh(["dvc", "exp", "list", "--name-only"], mate, env)


def _exp_refs(remote: Path, repo: Path, env: dict) -> set[str]:
    """The experiment refs (refs/exps/<baseline>/<name>) that the git remote ``remote`` holds."""
    listed = sh(["git", "ls-remote", str(remote), "refs/exps/*"], repo, env).split()
    return {ref for ref in listed if ref.startswith("refs/exps/")}


RAY_NODE_ENV = "CIFARCNN_TEST_RAY_NODE"  # marks every process of a test Ray node (they inherit it)


def _node_pids(node: str) -> list[int]:
    """Every process of the test Ray node ``node``: `ray start`, its raylet and agents, its
    workers, and what they started (a trial's dvc and its stages), found by the inherited marker."""
    marker, pids = f"{RAY_NODE_ENV}={node}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def _kill_node(node: str, sig: int) -> int:
    pids = _node_pids(node)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def _start_ray_node(args: list[str], env: dict, node: str, log: Path) -> subprocess.Popen:
    ray = Path(sys.executable).parent / "ray"
    return subprocess.Popen([str(ray), "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                             "--disable-usage-stats", "--block"], env={**env, RAY_NODE_ENV: node},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(address: str, env: dict) -> int:
    probe = "import ray; ray.init(address=%r, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))" % address
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else 0


def test_ray_cluster_sweep_survives_a_lost_node(team, tmp_path):
    """Issue 22's cluster form: a two-node Ray cluster on 127.0.0.1 (`ray start --head`, `ray
    start --address`), each node with its own scratch folder (CIFARCNN_TRIAL_DIR) and the team's
    credentials in its own environment; the git remote a bare repository, the DVC remote and the
    MLflow server the team stack's. `python -m cifarcnn.sweep --address` runs 2 lr x 2 seeds; the
    worker node is killed (every process of it, SIGKILL) while it trains a trial. Every point
    finishes (the lost one retried on the head), once: one experiment ref per point on origin; the
    lost attempt's MLflow run is KILLED, none is left RUNNING; a fresh clone's `dvc exp pull`
    lists all four."""
    import signal

    stack, repo, env = team
    origin = tmp_path / "origin.git"
    if subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True).returncode != 0:
        sh(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
        sh(["git", "remote", "add", "origin", str(origin)], repo, env)
    origin = Path(sh(["git", "remote", "get-url", "origin"], repo, env).strip())
    assert "team" in sh(["dvc", "remote", "list"], repo, env), "an earlier test configures the team's DVC remote"
    sh(["git", "push", "-q", "origin", "HEAD"], repo, env)
    sh(["dvc", "push"], repo, env, timeout=300)  # the trials pull their inputs from here
    # What each node's operator puts in that node's environment (`eval "$(python -m
    # cifarcnn.teamstack env --s3)"`): the MLflow login, the S3 keys and the team CA.
    printed = subprocess.run(["bash", "-c", 'eval "$("$0" -m cifarcnn.teamstack env --s3 --dir "$1")" && env -0',
                              sys.executable, str(stack.dir)], env=env, capture_output=True, text=True, check=True)
    exported = dict(item.split("=", 1) for item in printed.stdout.split("\0") if "=" in item)
    assert {k: exported.get(k) for k in stack.node_env()} == stack.node_env()  # odd secrets survive the shell
    # Ray's token auth, explicit and the same on every node and the driver (Ray turns it on by itself for a
    # head once ~/.ray/auth_token exists, e.g. after any local ray.init, and a joining node without the
    # token is refused: "InvalidAuthToken").
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
    # The head's GCS finds a lost node by health checks: by default 5 failed ones 3 s apart, 15 s
    # of the test's wall time spent waiting. Here every 0.5 s, dead after 3 (both nodes are local).
    node_env = {**env, **stack.node_env(), "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    scratch = {node: tmp_path / f"node-{node}" for node in ("head", "worker")}
    nodes, warm = {}, {}
    try:
        for node, folder in scratch.items():
            folder.mkdir()
            args = ["--head", f"--port={port}", "--include-dashboard=false"] if node == "head" else [f"--address={address}"]
            # Its own warm-stage server, as on a machine of its own: killing this node must not kill a
            # server the other node's stages are forks of (mkdtemp: 0700, as the launcher requires).
            warm[node] = Path(tempfile.mkdtemp(prefix="warm-"))
            nodes[node] = _start_ray_node(args, {**node_env, "CIFARCNN_TRIAL_DIR": str(folder),
                                                 "CIFARCNN_WARM_DIR": str(warm[node])}, node,
                                          tmp_path / f"ray-{node}.log")
            if node == "head":
                time.sleep(3)
        deadline = time.monotonic() + 180
        while _alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline, (tmp_path / "ray-worker.log").read_text()[-3000:]
            time.sleep(2)

        before = {r.info.run_id for r in experiment_runs()}
        refs_before = _exp_refs(origin, repo, env)  # an earlier test's experiments (the queued sweep pushed one)
        rates = ["0.0021", "0.0023"]
        names = {f"lr{lr}-seed{seed}": (lr, seed) for lr in rates for seed in (0, 1)}
        killed: dict = {}

        def open_training_run(name: str) -> bool:
            return bool(client().search_runs([client().get_experiment_by_name(EXPERIMENT).experiment_id],
                                             f"tags.dvc_exp_name = '{name}' and attributes.status = 'RUNNING'"))

        def kill_worker_mid_trial():
            """Once the worker node trains a trial and its MLflow run is open: kill -9 the node."""
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and "pids" not in killed:
                for pid in _node_pids("worker"):
                    try:
                        training = b"stages/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
                        cwd = os.readlink(f"/proc/{pid}/cwd")
                    except OSError:
                        continue
                    trial = re.search(r"/cifarcnn-trial-(.+)-[^-/]+/repo$", cwd)
                    if training and cwd.startswith(str(scratch["worker"])) and trial:
                        try:
                            if not open_training_run(trial.group(1)):
                                continue
                        except Exception:  # noqa: BLE001 - the server is busy; look again
                            continue
                        killed.update(cwd=cwd, name=trial.group(1), pids=_kill_node("worker", signal.SIGKILL))
                        break
                time.sleep(0.3)

        killer = threading.Thread(target=kill_worker_mid_trial, daemon=True)
        killer.start()
        started = time.monotonic()
        out = sh([sys.executable, "-m", "cifarcnn.sweep", "-S", f"lr={','.join(rates)}", "--seeds", "0,1",
                  "--address", address], repo, env, timeout=1800)
        MEASURED["ray_cluster_sweep_s"] = round(time.monotonic() - started, 1)
        killer.join(timeout=5)
        assert killed.get("pids"), f"the worker node never trained a trial:\n{out}"
        assert re.search(r"best: lr=0\.002[13] \(mean val acc 0\.\d{4}, test acc 0\.\d{4}, n=2\); 4 of 4 trials", out), out
        assert "marked 1 MLflow run(s) of lost or cancelled attempts KILLED" in out, out
        assert Path(killed["cwd"]).is_relative_to(scratch["worker"])  # the lost clone stays on its node's disk

        assert set(names) <= set(sh(["dvc", "exp", "list", "--name-only"], repo, env).split())  # pulled back here
        pushed = sorted(ref.rsplit("/", 1)[-1] for ref in _exp_refs(origin, repo, env) - refs_before)
        assert pushed == sorted(names), pushed  # one per point (a retried point's second push replaces its ref)
        new = [r for r in experiment_runs() if r.info.run_id not in before]
        [parent] = [r for r in new if r.data.tags.get("sweep")]
        assert parent.info.status == "FINISHED"
        trained = [r for r in new if r.data.tags.get("dvc_stage", "").startswith("train@task3e-")]
        finished = [r for r in trained if r.info.status == "FINISHED"]
        assert sorted(r.data.tags["dvc_exp_name"] for r in finished) == sorted(names)
        for run in finished:
            lr, seed = names[run.data.tags["dvc_exp_name"]]
            assert float(run.data.params["lr"]) == float(lr) and run.data.tags["dvc_stage"] == f"train@task3e-{seed}"
        [lost] = [r for r in trained if r.info.status != "FINISHED"]
        assert lost.data.tags["dvc_exp_name"] == killed["name"], lost
        assert lost.info.status == "KILLED" and lost.data.tags.get("killed_by", "").startswith("sweep driver"), lost
        assert not [r for r in new if r.info.status == "RUNNING"]

        mate = tmp_path / "teammate"
        sh(["git", "clone", "-q", str(origin), str(mate)], tmp_path, env)
        trust_the_team_ca(mate, stack, env)
        sh(["dvc", "exp", "pull", "origin", *names], mate, {**env, **stack.s3_env()}, timeout=300)
        assert set(names) <= set(sh(["dvc", "exp", "list", "--name-only"], mate, env).split())
    finally:
        for node in ("worker", "head"):
            _kill_node(node, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (_node_pids("worker") or _node_pids("head")) and time.monotonic() < deadline:
            time.sleep(0.5)
        for node in ("worker", "head"):
            _kill_node(node, signal.SIGKILL)
        for proc in nodes.values():
            proc.wait(timeout=30)
        for folder in warm.values():
            warm_launcher.stop(folder)  # the head's server (the worker's died with its node)
            shutil.rmtree(folder, ignore_errors=True)


def test_start_after_a_crash_cleans_up_and_starts(team):
    """kill -9 of each service in turn (PostgreSQL's postmaster, weed, the MLflow server with its
    workers): the stack no longer counts as running, and `start` stops what is left of it
    (instead of failing on a data folder's lock) and comes up on the same ports. Runs last: it
    restarts the stack."""
    import signal

    stack, _, _ = team
    for service in ("postgres", "s3", "mlflow"):
        before = stack.state()
        if service == "postgres":
            os.kill(int((stack.dir / "postgres" / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        else:  # the process group: a server and its workers, a crash, not a stop
            os.killpg(before["pids"][service], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while stack.running():  # a killed server's workers may answer /health for a moment
            assert time.monotonic() < deadline, f"the stack still counts as running with {service} killed"
            time.sleep(0.2)
        after = stack.start()
        assert stack.running(), service
        assert after["ports"] == before["ports"] and after["mlflow_uri"] == before["mlflow_uri"], service
        assert all(stack.service_alive(name) for name in stack.services()), service

    # stack.json lost (the PIDs with it): `stop` finds every process by what it holds (PostgreSQL's
    # data folder, weed's leveldb lock, the logs it writes), and `start` comes up on the same ports.
    before = stack.state()
    stack.state_file.unlink()
    stop = subprocess.run([sys.executable, "-m", "cifarcnn.teamstack", "stop", "--dir", str(stack.dir)],
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert "team stack: stopping pid" in stop.stderr and "which still held a file under" in stop.stderr, stop.stderr
    running = {pid: proc_state(pid) for pid in before["pids"].values() if _running(pid)}
    assert not _holders(stack.dir) and not running, running
    assert all(_port_free(stack.host, port) for port in before["ports"].values())
    after = stack.start()
    assert stack.running() and after["ports"] == before["ports"]
