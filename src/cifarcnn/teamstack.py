"""The team stack: a shared MLflow server on PostgreSQL and an S3 object store, and a DVC remote
on the same store, started and stopped by one command each (bound to 127.0.0.1 by default):

    python -m cifarcnn.teamstack start            # PostgreSQL, SeaweedFS (S3), mlflow server with auth
    eval "$(python -m cifarcnn.teamstack env)"    # this shell logs to it: MLFLOW_TRACKING_URI + credentials
    python -m cifarcnn.teamstack remote           # DVC remote `team` on the same store (keys in .dvc/config.local)
    python -m cifarcnn.teamstack stop

- PostgreSQL is MLflow's backend store (``initdb`` into ``<dir>/postgres``, run as the
  ``postgres`` user when started by root, which PostgreSQL refuses to run as);
- SeaweedFS (``weed server -s3``) holds the bucket ``mlflow`` (artifacts) and ``dvc`` (the DVC
  remote); every request needs the access keys: an anonymous one is refused;
- ``mlflow server --app-name basic-auth`` serves the runs and proxies the artifacts (clients need
  no S3 keys); a request without the user and password gets 401.

SeaweedFS's own master, volume and filer ports speak mutual TLS with a private CA made into
``<dir>/tls/``; with ``--tls CERT KEY`` (TEAM_TLS_CERT/TEAM_TLS_KEY, clients verify with
TEAM_TLS_CA) MLflow and S3 are served over HTTPS only. Named users: ``user add NAME
--permission read|edit|manage``, ``user list``, ``user remove NAME``.

A team with its own database sets ``TEAM_BACKEND_STORE_URI`` (e.g.
``postgresql+psycopg2://mlflow:...@db.internal/mlflow``, read from the environment only, as it
holds a password): no local PostgreSQL is started, and the users live in ``TEAM_AUTH_DB_URI``
(default: ``<dir>/basic_auth.db``).

Secrets (the database password, the S3 keys, the MLflow admin password) come from the
environment when set (``TEAM_PG_PASSWORD``, ``TEAM_S3_ACCESS_KEY``, ``TEAM_S3_SECRET_KEY``,
``TEAM_MLFLOW_PASSWORD``), else they are generated once into ``<dir>/secrets.env`` (mode 600;
``.team/`` is git-ignored). They never go into git, params or MLflow tags. The state (ports,
PIDs) is ``<dir>/stack.json``; the ports, kept from the first start, ``<dir>/ports.json``
(``TEAM_PORT_<NAME>`` sets one). ``stop`` ends every process it started, by PID, and any
process still writing a file under ``<dir>``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import UserError, cli

DEFAULT_DIR = Path(".team")
PG_BIN = Path(os.environ.get("TEAM_PG_BIN", "/usr/lib/postgresql/15/bin"))
BUCKETS = ("mlflow", "dvc")  # MLflow's artifacts; DVC's remote
SECRET_KEYS = ("TEAM_PG_PASSWORD", "TEAM_S3_ACCESS_KEY", "TEAM_S3_SECRET_KEY", "TEAM_MLFLOW_PASSWORD")
MLFLOW_ADMIN = "admin"
AUTH_CACHE_TTL_S = 300  # seconds MLflow remembers a checked password (basic_auth.ini: auth_cache_ttl_seconds)
SERVICES = ("postgres", "s3", "mlflow")  # in start order; stopped in reverse


PORT_NAMES = ("postgres", "mlflow", "s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer",
              "filer_grpc")


def _write_internal_certs(folder: Path, host: str) -> None:
    """A CA and one certificate (server and client use) for ``host``, 127.0.0.1 and localhost,
    signed by it: the stack's SeaweedFS processes present it to each other. Keys mode 600."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cifarcnn team stack CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        if host != "127.0.0.1":
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:  # a host name
        names.append(x509.DNSName(host))
    node = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    for name, data in (("ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
                       ("node.key", node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption())),
                       ("ca.crt", ca.public_bytes(pem)), ("node.crt", node.public_bytes(pem))):
        path = folder / name
        path.touch(mode=0o600)
        os.chmod(path, 0o600)
        path.write_bytes(data)


PORT_WAIT_S = 10  # how long a port of the last start may stay bound by a stopped service before it is replaced


def _port_free(host: str, port: int) -> bool:
    """Nothing listens there (SO_REUSEADDR as servers bind: a stopped one's TIME_WAIT is no obstacle)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _listeners(port: int) -> set[int]:
    """The socket inodes listening on ``port`` (TCP, IPv4 and IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cells = line.split()
            if cells[3] == "0A" and int(cells[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(int(cells[9]))
    return inodes


def _writing(fdinfo: Path) -> bool:
    """Whether the descriptor is open for writing (O_WRONLY or O_RDWR): a reader such as
    `tail -f` on a log is no part of the stack."""
    for line in fdinfo.read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8) & 3 != 0
    return False


def _holders(folder: Path | None = None, port: int | None = None) -> dict[int, str]:
    """{pid: command line} of the processes holding a file under ``folder`` open for writing
    (a data folder's files and lock, a log as stdout) or listening on ``port``; this process
    excluded. Processes of other users are invisible unless run as root."""
    sockets = {f"socket:[{inode}]" for inode in _listeners(port)} if port else set()
    prefix = f"{Path(folder).resolve()}/" if folder else None
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target in sockets or (prefix and target.startswith(prefix) and _writing(proc / "fdinfo" / fd.name)):
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    found[int(proc.name)] = cmd[:120]
                    break
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


AFTER_A_PORT_MOVES = {"s3": "`python -m cifarcnn.teamstack remote` in each checkout",  # DVC's endpointurl
                      "mlflow": "clients re-run `python -m cifarcnn.teamstack env`"}  # MLFLOW_TRACKING_URI


def _port_env(name: str) -> str:
    return f"TEAM_PORT_{name.upper()}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it if it exited
        return waited == 0
    except ChildProcessError:  # not our child (started by an earlier command)
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. A member that exited and awaits its parent's
    wait() (a zombie: a service this process spawned) holds no file or port and counts as gone;
    killpg(pgid, 0) alone would count it, and `stop` would wait out every timeout."""
    _alive(pgid)  # the leader, when it is our child: reaped here if it exited
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1].strip()[:300] if lines else "no output"


def _wait(what: str, ready, timeout: float, log: Path, pid: int | None = None) -> float:
    """Poll ``ready()`` until true; the seconds it took, or a one-line error with the log's last line."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if ready():
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if pid is not None and not _alive(pid):
            raise UserError(f"{what} exited while starting ({_last_line(log)}); see {log}")
        time.sleep(0.3)
    raise UserError(f"{what} did not come up within {timeout:g} s ({_last_line(log)}); see {log}")


TLS_ENV = ("TEAM_TLS_CERT", "TEAM_TLS_KEY", "TEAM_TLS_CA")


def _tls_settings() -> dict | None:
    """The team's certificate for MLflow and S3 (``--tls CERT KEY`` or TEAM_TLS_CERT/TEAM_TLS_KEY),
    and what clients verify it with (TEAM_TLS_CA; default: the certificate itself, right for a
    self-signed one). None: plain HTTP (for 127.0.0.1 only)."""
    cert, key, ca = (os.environ.get(k) for k in TLS_ENV)
    if not cert and not key:
        return None
    if not (cert and key):
        raise UserError("TLS needs both TEAM_TLS_CERT and TEAM_TLS_KEY (or --tls CERT KEY)")
    paths = {"cert": Path(cert), "key": Path(key), "ca": Path(ca or cert)}
    for what, path in paths.items():
        if not path.is_file():
            raise UserError(f"TLS {what} {path} is not a file; give the team's certificate, its key and (for clients) its CA")
    return {what: str(path.resolve()) for what, path in paths.items()}


def _open(url: str, ca: str | None = None, auth: tuple[str, str] | None = None, timeout: float = 5):
    """urlopen with the team's CA (for its own certificate) and, if given, basic auth."""
    import base64
    import ssl

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    context = ssl.create_default_context(cafile=ca) if ca else None
    return urllib.request.urlopen(request, timeout=timeout, context=context)


def _http_status(url: str, ca: str | None = None) -> int:
    try:
        with _open(url, ca) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _get_json(url: str, ca: str | None, auth: tuple[str, str]) -> dict:
    with _open(url, ca, auth, timeout=30) as response:
        return json.loads(response.read())


class Stack:
    """One stack's folder: its secrets, state, data and logs."""

    def __init__(self, directory: Path = DEFAULT_DIR, host: str = "127.0.0.1") -> None:
        self.dir = Path(directory).resolve()
        self.host = host
        self.backend_uri = os.environ.get("TEAM_BACKEND_STORE_URI")  # a team's own database, if any
        self.state_file = self.dir / "stack.json"
        self.secrets_file = self.dir / "secrets.env"
        self.tls = _tls_settings()  # HTTPS for MLflow and S3 when the team gives a certificate

    def _tls(self, state: dict | None = None) -> dict | None:
        return (state if state is not None else self.state()).get("tls")

    def ca_bundle(self, state: dict | None = None) -> str | None:
        """What clients verify the team's certificate against (None: plain HTTP)."""
        tls = self._tls(state)
        return tls["ca"] if tls else None

    # --- secrets and state ------------------------------------------------------------
    def secrets(self) -> dict[str, str]:
        """From the environment when set, else from (or generated once into) secrets.env."""
        stored: dict[str, str] = {}
        if self.secrets_file.exists():
            for line in self.secrets_file.read_text().splitlines():
                key, _, value = line.partition("=")
                if key in SECRET_KEYS:
                    stored[key] = value
        missing = [k for k in SECRET_KEYS if k not in stored and not os.environ.get(k)]
        if missing:
            stored.update({k: ("AK" + secrets.token_hex(8).upper() if k == "TEAM_S3_ACCESS_KEY" else secrets.token_urlsafe(24))
                           for k in missing})
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.secrets_file.with_suffix(".tmp")
            tmp.touch(mode=0o600)
            tmp.write_text("".join(f"{k}={v}\n" for k, v in stored.items()))
            os.replace(tmp, self.secrets_file)
        return {k: os.environ.get(k) or stored[k] for k in SECRET_KEYS}

    def state(self) -> dict:
        if not self.state_file.exists():
            raise UserError(f"no team stack in {self.dir}: start it with `python -m cifarcnn.teamstack start`")
        return json.loads(self.state_file.read_text())

    def _save(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    # --- what clients use -------------------------------------------------------------
    def client_env(self) -> dict[str, str]:
        """What a shell or CI job sets to log to the server (no S3 keys: artifacts are proxied)."""
        state, keys = self.state(), self.secrets()
        return {"MLFLOW_TRACKING_URI": state["mlflow_uri"], "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
                "MLFLOW_TRACKING_PASSWORD": keys["TEAM_MLFLOW_PASSWORD"],
                **({"MLFLOW_TRACKING_SERVER_CERT_PATH": self.ca_bundle(state)} if self.ca_bundle(state) else {})}

    def node_env(self) -> dict[str, str]:
        """What a machine that trains for the team sets (a Ray node of a sweep, a CI runner): the
        MLflow login, and the object store's keys for DVC's remote with the team CA (DVC's S3
        client reads AWS_CA_BUNDLE when the remote sets no ssl_verify, as in a fresh clone)."""
        ca = self.ca_bundle()
        return {**self.client_env(), **self.s3_env(), **({"AWS_CA_BUNDLE": ca} if ca else {})}

    def s3_env(self) -> dict[str, str]:
        """The object store's keys, for DVC's remote and for the server (not for MLflow clients)."""
        keys = self.secrets()
        return {"AWS_ACCESS_KEY_ID": keys["TEAM_S3_ACCESS_KEY"], "AWS_SECRET_ACCESS_KEY": keys["TEAM_S3_SECRET_KEY"],
                "AWS_DEFAULT_REGION": "us-east-1"}

    # --- the services -----------------------------------------------------------------
    def _as_postgres(self) -> list[str]:
        """PostgreSQL refuses to run as root: then run its tools as the postgres user."""
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")
            if subprocess.run([*self._as_postgres(), "test", "-w", str(path)], capture_output=True).returncode != 0:
                raise UserError(f"PostgreSQL runs as the postgres user (it refuses root), which cannot reach {path}; "
                                "use --dir in a folder every user can enter (e.g. under /tmp or /srv)")

    def _start_postgres(self, state: dict, keys: dict) -> None:
        data, run = self.dir / "postgres", self.dir / "postgres-run"
        self._own(run)
        if not (data / "PG_VERSION").exists():
            self._own(data)
            pwfile = run / "pw"
            pwfile.write_text(keys["TEAM_PG_PASSWORD"] + "\n")
            os.chmod(pwfile, 0o600)
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            try:
                subprocess.run([*self._as_postgres(), str(PG_BIN / "initdb"), "-D", str(data), "-U", "mlflow",
                                f"--pwfile={pwfile}", "-A", "scram-sha-256", "--no-instructions"],
                               check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as err:
                raise UserError(f"initdb failed: {(err.stderr or err.stdout).strip().splitlines()[-1]}") from err
            finally:
                pwfile.unlink(missing_ok=True)
        self._pg_ctl("start", state)
        env = {**os.environ, "PGPASSWORD": keys["TEAM_PG_PASSWORD"]}
        for db in ("mlflow", "mlflow_auth"):
            subprocess.run([str(PG_BIN / "createdb"), "-h", self.host, "-p", str(state["ports"]["postgres"]),
                            "-U", "mlflow", db], env=env, capture_output=True)  # exists already: fine

    def _pg_ctl(self, action: str, state: dict) -> None:
        data, run = self.dir / "postgres", self.dir / "postgres-run"
        args = [*self._as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
        if action == "start":
            args += ["-l", str(run / "postgres.log"), "-o", f"-p {state['ports']['postgres']} -h {self.host} -k {run}",
                     "start"]
        else:
            args += ["-m", "fast", "stop"]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0 and action == "start":
            raise UserError(f"PostgreSQL did not start ({proc.stderr.strip() or proc.stdout.strip()}); see "
                            f"{run / 'postgres.log'}")

    def _spawn(self, name: str, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        with open(self.dir / "logs" / f"{name}.log", "ab") as log:  # the child keeps its copy; ours is closed,
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,  # or `stop` would take us for a service
                                    env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd)
        return proc.pid

    def _seaweed_security(self) -> Path:
        """SeaweedFS's own ports (master, volume, filer: HTTP and gRPC) closed to anyone without
        the stack's client certificate: a private CA made once into <dir>/tls/ (keys mode 600)
        and a security.toml that makes every one of them mutual TLS. Only the S3 port speaks
        to outsiders, and it wants the access keys. Returns the folder to start `weed` in
        (it reads ./security.toml)."""
        folder = (self.dir / "tls").resolve()
        folder.mkdir(mode=0o700, exist_ok=True)
        ca_crt, node_crt, node_key = folder / "ca.crt", folder / "node.crt", folder / "node.key"
        if not (ca_crt.exists() and node_crt.exists() and node_key.exists()):
            _write_internal_certs(folder, self.host)
        toml = [f'[grpc]\nca = "{ca_crt}"\n']
        for part in ("volume", "master", "filer", "s3", "client"):
            toml.append(f'[grpc.{part}]\ncert = "{node_crt}"\nkey = "{node_key}"\n')
        toml.append(f'[https.client]\nenabled = true\ncert = "{node_crt}"\nkey = "{node_key}"\nca = "{ca_crt}"\n')
        for part in ("volume", "master", "filer"):  # with ca set, a client certificate is required
            toml.append(f'[https.{part}]\ncert = "{node_crt}"\nkey = "{node_key}"\nca = "{ca_crt}"\n')
        toml.append('[access]\nui = false\n')
        security = folder / "security.toml"
        security.touch(mode=0o600)
        security.write_text("\n".join(toml))
        return folder

    def _start_s3(self, state: dict, keys: dict) -> None:
        p = state["ports"]
        (self.dir / "seaweedfs").mkdir(parents=True, exist_ok=True)
        config = self.dir / "s3.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [{
            "name": "team", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": keys["TEAM_S3_ACCESS_KEY"], "secretKey": keys["TEAM_S3_SECRET_KEY"]}]}]}))
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        security = self._seaweed_security()
        state["pids"]["s3"] = self._spawn("s3", [
            weed, "server", f"-dir={(self.dir / 'seaweedfs').resolve()}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=20",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config.resolve()}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            # One master: no peer to elect, so a restart on its saved raft state need not wait
            # out the multi-master default of 10 s (measured: start after a stop 15 s -> 3.5 s).
            "-master.electionTimeout=1s",
            *([f"-s3.cert.file={tls['cert']}", f"-s3.key.file={tls['key']}"] if (tls := self._tls(state)) else [])],
            cwd=security)  # with a certificate the S3 port speaks HTTPS only
        self._save(state)
        _wait("SeaweedFS S3", lambda: self._buckets(state), 120, self.dir / "logs" / "s3.log", state["pids"]["s3"])

    def _s3(self, state: dict):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=state["s3_url"], config=Config(retries={"max_attempts": 1}),
                            verify=self.ca_bundle(state),
                            **{k.lower(): v for k, v in self.s3_env().items() if k != "AWS_DEFAULT_REGION"},
                            region_name="us-east-1")

    def _buckets(self, state: dict) -> bool:
        s3 = self._s3(state)
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS:
            if bucket not in have:
                s3.create_bucket(Bucket=bucket)
        return True

    def _start_mlflow(self, state: dict, keys: dict) -> None:
        # Quoted: a password with "@", ":" or "/" would otherwise end the URI's user part early.
        pg = (f"postgresql+psycopg2://mlflow:{urllib.parse.quote(keys['TEAM_PG_PASSWORD'], safe='')}"
              f"@{self.host}:{state['ports']['postgres']}")
        backend = self.backend_uri or f"{pg}/mlflow"
        users = os.environ.get("TEAM_AUTH_DB_URI") or (
            f"sqlite:///{self.dir / 'basic_auth.db'}" if self.backend_uri else f"{pg}/mlflow_auth")
        auth_ini = self.dir / "basic_auth.ini"
        auth_ini.touch(mode=0o600)
        def ini(value: str) -> str:  # MLflow reads this with configparser, whose interpolation takes "%"
            return value.replace("%", "%%")
        auth_ini.write_text("[mlflow]\ndefault_permission = READ\n"
                            f"database_uri = {ini(users)}\n"
                            f"admin_username = {MLFLOW_ADMIN}\nadmin_password = {ini(keys['TEAM_MLFLOW_PASSWORD'])}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                            # Every request carries the password, and checking it against its scrypt hash
                            # costs about 0.1 s of CPU here: more than most requests themselves (a training
                            # run makes hundreds). A checked password is remembered for this long instead.
                            # One worker (below), so `user remove` and a password change through the API
                            # clear it at once; only an edit of the users' database behind MLflow's back
                            # waits out the TTL.
                            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
        # The store URI holds the database password: it goes in the environment (readable by this
        # user only), not in argv, which every user on the machine can read with `ps`.
        tls = self._tls(state)
        env = {**self.s3_env(), "MLFLOW_S3_ENDPOINT_URL": state["s3_url"], "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
               **({"AWS_CA_BUNDLE": tls["ca"]} if tls else {}),  # the server's own S3 client, over HTTPS
               "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["TEAM_MLFLOW_PASSWORD"], "MLFLOW_BACKEND_STORE_URI": backend,
               # MLflow 3's job runner (GenAI jobs this project never submits): seven more Python processes
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        state["pids"]["mlflow"] = self._spawn("mlflow", [
            str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
            "--artifacts-destination", "s3://mlflow/artifacts",
            "--host", self.host, "--port", str(state["ports"]["mlflow"]), "--workers", "1",
            *(["--uvicorn-opts", f"--ssl-certfile {tls['cert']} --ssl-keyfile {tls['key']}"] if tls else [])], env)
        self._save(state)
        _wait("mlflow server", lambda: _http_status(f"{state['mlflow_uri']}/health", self.ca_bundle(state)) == 200, 180,
              self.dir / "logs" / "mlflow.log", state["pids"]["mlflow"])

    # --- commands ---------------------------------------------------------------------
    def start(self) -> dict:
        """Start every service (a running stack is left as it is); returns the state."""
        if self.running():
            return self.state()
        if self.state_file.exists() or (self.dir.exists() and _holders(self.dir)):
            # A stack that died uncleanly (kill -9, a reboot, a lost stack.json): what is left of
            # it (a PostgreSQL holding its data folder, a `weed` holding its leveldb lock and its
            # ports) would make this start fail; stop it first.
            print("team stack: the last one did not stop cleanly; stopping what is left of it", file=sys.stderr)
            self.stop()
        keys = self.secrets()
        ports = self._ports()  # a port someone else holds ends here, before anything is started
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        scheme = "https" if self.tls else "http"
        state = {"host": self.host, "ports": ports, "pids": {}, "seconds": {}, "tls": self.tls,
                 "mlflow_uri": f"{scheme}://{self.host}:{ports['mlflow']}", "s3_url": f"{scheme}://{self.host}:{ports['s3']}"}
        self._save(state)
        try:
            for name in self.services():
                started = time.monotonic()
                self.start_service(name, state, keys)
                state["seconds"][name] = round(time.monotonic() - started, 1)
                self._save(state)
        except BaseException:
            self.stop()
            raise
        return state

    def _ports(self) -> dict[str, int]:
        """The ports of the last start (kept in ports.json, which `stop` leaves), so the DVC
        remote's committed endpointurl and every client's MLFLOW_TRACKING_URI stay valid across
        restarts; free ones at the first start. TEAM_PORT_<NAME> (e.g. TEAM_PORT_S3) sets one.
        A port someone else holds is an error that names it and its setting: moving it silently
        would strand every client."""
        saved_file = self.dir / "ports.json"
        saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
        ports: dict[str, int] = {}
        for name in PORT_NAMES:
            setting = _port_env(name)
            try:
                want = int(os.environ[setting]) if os.environ.get(setting) else saved.get(name)
            except ValueError:
                raise UserError(f"{setting}={os.environ[setting]!r} is not a port number") from None
            if not want:
                port = free_port(self.host)
                while port in ports.values():
                    port = free_port(self.host)
                ports[name] = port
                continue
            if want in ports.values():
                raise UserError(f"port {want} is set for both {name} and "
                                f"{next(k for k, v in ports.items() if v == want)}; give {setting} another one")
            deadline = time.monotonic() + PORT_WAIT_S  # a service stopped a moment ago may still hold it
            while not _port_free(self.host, want) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _port_free(self.host, want):
                holders = _holders(port=want)
                by = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders.items()) or "another process"
                raise UserError(f"port {want} ({name}) is taken by {by}; stop it, or set {setting} to a free port "
                                f"(then {AFTER_A_PORT_MOVES.get(name, 'nothing else changes')})")
            ports[name] = want
        saved_file.write_text(json.dumps(ports, indent=2) + "\n")
        return ports

    def start_service(self, name: str, state: dict | None = None, keys: dict | None = None) -> None:
        state, keys = state or self.state(), keys or self.secrets()
        {"postgres": self._start_postgres, "s3": self._start_s3, "mlflow": self._start_mlflow}[name](state, keys)

    def stop_service(self, name: str) -> None:
        state = self.state()
        if name == "postgres":
            self._pg_ctl("stop", state)
            return
        pid = state["pids"].pop(name, None)
        self._save(state)
        if pid:
            _terminate(pid, group=True)

    def restart(self, name: str) -> float:
        """Stop one service and start it again on the same ports and data; the seconds it was away."""
        started = time.monotonic()
        self.stop_service(name)
        self.start_service(name)
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every process of the stack, whatever state it is in: by the PIDs stack.json
        records, then any process still holding a file under the stack's folder (PostgreSQL's
        data folder, weed's leveldb lock, a log as its stdout), e.g. an orphan of a crashed
        start whose PID was never recorded."""
        if self.state_file.exists():
            for name in reversed(self.services()):
                try:
                    self.stop_service(name)
                except Exception as err:  # noqa: BLE001 - stop the others anyway
                    print(f"stopping {name}: {err}", file=sys.stderr)
        elif "postgres" in self.services() and self.service_alive("postgres", {}):
            self._pg_ctl("stop", {})  # its data folder's postmaster.pid names it: a clean shutdown first
        left = _holders(self.dir) if self.dir.exists() else {}
        for pid, cmd in left.items():
            print(f"team stack: stopping pid {pid} ({cmd}), which still held a file under {self.dir}", file=sys.stderr)
            _terminate(pid, group=_own_group(pid))
        self.state_file.unlink(missing_ok=True)

    def services(self) -> tuple[str, ...]:
        return tuple(s for s in SERVICES if not (s == "postgres" and self.backend_uri))

    def service_alive(self, name: str, state: dict | None = None) -> bool:
        """Whether ``name``'s process is alive (PostgreSQL: the postmaster its pid file names)."""
        state = state if state is not None else self.state()
        if name == "postgres":
            try:
                pid = int((self.dir / "postgres" / "postmaster.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return False
        else:
            pid = state["pids"].get(name)
        return bool(pid) and _alive(pid)

    def running(self) -> bool:
        """Every service alive and MLflow answering: a stack with one service crashed is not
        running, so `start` stops what is left of it and starts it whole."""
        try:
            state = self.state()
            return all(self.service_alive(name, state) for name in self.services()) and \
                _http_status(f"{state['mlflow_uri']}/health", self.ca_bundle(state)) == 200
        except Exception:  # noqa: BLE001
            return False

    def configure_dvc_remote(self, repo: Path, name: str = "team") -> None:
        """`dvc remote add -d team s3://dvc/cache` with the store's endpoint; the keys go to
        .dvc/config.local (git-ignored by DVC), never to .dvc/config, and never through argv
        (`dvc remote modify --local team secret_access_key KEY` shows KEY to every `ps`, and
        a key that starts with "-" is read as an option)."""
        from dvc.config import Config

        state, s3 = self.state(), self.s3_env()
        for args in (["remote", "add", "-d", "-f", name, "s3://dvc/cache"],
                     ["remote", "modify", name, "endpointurl", state["s3_url"]]):
            subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)
        local = Path(repo) / ".dvc" / "config.local"
        local.touch(mode=0o600)  # before the keys are in it
        with Config(dvc_dir=str(Path(repo) / ".dvc")).edit("local") as conf:
            conf["remote"].setdefault(name, {}).update(
                {"access_key_id": s3["AWS_ACCESS_KEY_ID"], "secret_access_key": s3["AWS_SECRET_ACCESS_KEY"],
                 **({"ssl_verify": self.ca_bundle(state)} if self.ca_bundle(state) else {})})


PERMISSIONS = {"read": "READ", "edit": "EDIT", "manage": "MANAGE"}  # `user add --permission`: MLflow's names
USER_PASSWORD_ENV = "TEAM_USER_PASSWORD"  # a new user's password, from the environment (else generated, shown once)


class Users:
    """Named MLflow users of the stack, through MLflow's auth API as the stack's admin. Every
    user reads every experiment (the server's default permission is READ); ``edit`` lets one log
    runs to the project's experiment and add versions to its registered models, ``manage`` also
    grant others; only the admin manages users."""

    def __init__(self, stack: "Stack") -> None:
        self.stack = stack
        self.env = stack.client_env()

    def _as_admin(self):
        os.environ.update(self.env)  # MLflow's REST clients read the credentials from here
        from mlflow.server.auth.client import AuthServiceClient
        from mlflow.tracking import MlflowClient

        return AuthServiceClient(self.env["MLFLOW_TRACKING_URI"]), MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def add(self, name: str, permission: str, experiment: str, models: list[str]) -> str | None:
        """Create ``name``; the generated password when none came from the environment."""
        if permission not in PERMISSIONS:
            raise UserError(f"--permission: expected one of {', '.join(PERMISSIONS)}, got {permission!r}")
        password = os.environ.get(USER_PASSWORD_ENV)
        generated = None if password else secrets.token_urlsafe(18)
        auth, client = self._as_admin()
        try:
            auth.create_user(name, password or generated)
        except Exception as err:  # noqa: BLE001 - the server says why (taken name, bad password)
            raise UserError(f"user {name!r} was not created: {str(err).splitlines()[0][:200]}") from err
        if permission != "read":
            found = client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else client.create_experiment(experiment)
            auth.grant_user_permission(name, "experiment", exp_id, PERMISSIONS[permission])
            for model in models:
                try:
                    client.get_registered_model(model)
                except Exception:  # noqa: BLE001 - not registered yet: made here, so a grant can name it
                    client.create_registered_model(model)
                auth.grant_user_permission(name, "registered_model", model, PERMISSIONS[permission])
        return generated

    def remove(self, name: str) -> None:
        auth, _ = self._as_admin()
        try:
            auth.delete_user(name)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"user {name!r} was not removed: {str(err).splitlines()[0][:200]}") from err

    def list(self) -> list[dict]:
        auth = (self.env["MLFLOW_TRACKING_USERNAME"], self.env["MLFLOW_TRACKING_PASSWORD"])
        return _get_json(f"{self.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/users/list", self.stack.ca_bundle(),
                         auth).get("users", [])


def _own_group(pid: int) -> bool:
    """Whether ``pid`` leads its own process group (every service is spawned so)."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _terminate(pid: int, group: bool, timeout: float = 5) -> None:
    """SIGTERM to ``pid`` (its whole process group with ``group``), SIGKILL after ``timeout`` s
    (a server waiting on idle keep-alive connections would hold its port for long), and wait
    until it is gone, and its ports with it, before anything is started again."""
    def gone() -> bool:
        return not (_group_alive(pid) if group else _alive(pid))

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            (os.killpg if group else os.kill)(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.1)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarcnn.teamstack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "env", "remote", "status", "user"])
    parser.add_argument("action", nargs="?", choices=["add", "list", "remove"], help="user: what to do")
    parser.add_argument("name", nargs="?", help="user add/remove: the user name")
    parser.add_argument("--permission", default="read", choices=list(PERMISSIONS),
                        help="user add: read (browse), edit (log runs, add model versions), manage (also grant)")
    parser.add_argument("--experiment", default="cifar10-cnn-report", help="user add: the experiment it may edit")
    parser.add_argument("--model", action="append", default=None,
                        help="user add: a registered model it may add versions to (default: cifar10-task3e)")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("TEAM_STACK_DIR", DEFAULT_DIR)))
    parser.add_argument("--host", default=os.environ.get("TEAM_STACK_HOST", "127.0.0.1"))
    parser.add_argument("--s3", action="store_true",
                        help="env: also the object store's keys and CA, for DVC's remote (a Ray node, a CI runner)")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                        help="start: serve MLflow and S3 over HTTPS with the team's certificate (TEAM_TLS_CERT/KEY)")
    args = parser.parse_args(argv)
    if args.tls:
        os.environ["TEAM_TLS_CERT"], os.environ["TEAM_TLS_KEY"] = args.tls
    stack = Stack(args.dir, args.host)
    if args.command == "user":
        if args.action is None or (args.action != "list" and not args.name):
            parser.error("user add NAME | user list | user remove NAME")
        users = Users(stack)
        if args.action == "add":
            password = users.add(args.name, args.permission, args.experiment, args.model or ["cifar10-task3e"])
            print(f"user {args.name}: {args.permission}" + (f" on {args.experiment}" if args.permission != "read" else "")
                  + (f"; password (shown once, not stored): {password}" if password
                     else f"; password from {USER_PASSWORD_ENV}"))
        elif args.action == "remove":
            users.remove(args.name)
            print(f"user {args.name} removed")
        else:
            for user in users.list():
                print(f"{user.get('username')}{' (admin)' if user.get('is_admin') else ''}")
    elif args.command == "start":
        state = stack.start()
        print(f"team stack up: MLflow {state['mlflow_uri']} (user {MLFLOW_ADMIN}), S3 {state['s3_url']} "
              f"(buckets {', '.join(BUCKETS)}), "
              f"{'your TEAM_BACKEND_STORE_URI' if stack.backend_uri else 'PostgreSQL %s:%s' % (state['host'], state['ports']['postgres'])}; "
              f"secrets in {stack.secrets_file}; `eval \"$(python -m cifarcnn.teamstack env)\"` to use it")
    elif args.command == "stop":
        stack.stop()
        print(f"team stack in {stack.dir} stopped")
    elif args.command == "env":
        env = stack.node_env() if args.s3 else stack.client_env()
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), end="")
    elif args.command == "remote":
        stack.configure_dvc_remote(Path.cwd())
        print("DVC remote `team` -> s3://dvc/cache (keys in .dvc/config.local); `dvc push` / `dvc pull`")
    else:
        print(json.dumps({**stack.state(), "running": stack.running()}, indent=2))


if __name__ == "__main__":
    main()
