"""EtcdConfig: the etcd client's TLS and auth settings, checked at start with one message naming
the variable (services/common/config.py, services/common/etcd.py check_config), and turned into
the one client every service makes (`Etcd.from_config`)."""
from __future__ import annotations

import pytest

from scripts.pki import CertificateAuthority
from services.common.config import CommonConfig, ConfigError, EtcdConfig, load
from services.common.etcd import Etcd, EtcdAccess


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("etcd-pki")
    ca = CertificateAuthority("etcd-ca")
    cert, key = ca.issue("client").write(directory, "client")
    _, other_key = ca.issue("other").write(directory, "other")
    password = directory / "password"
    password.write_text("s3cret-etcd-password\n")
    return {"ca": str(ca.write(directory / "ca.pem")), "cert": str(cert), "key": str(key),
            "other_key": str(other_key), "password": str(password), "missing": str(directory / "missing.pem")}


def error_of(environ) -> str:
    with pytest.raises(ConfigError) as error:
        load(EtcdConfig, environ)
    return str(error.value)


def test_the_default_is_plaintext_without_auth():
    config = load(EtcdConfig, {})
    assert EtcdAccess.from_config(config) == EtcdAccess() and not EtcdAccess.from_config(config).tls


@pytest.mark.parametrize("environ, message", [
    ({"ETCD_CERT_FILE": "{cert}"}, "ETCD_CERT_FILE and ETCD_KEY_FILE: set both or neither"),
    ({"ETCD_CERT_FILE": "{cert}", "ETCD_KEY_FILE": "{key}"}, "ETCD_CERT_FILE needs ETCD_CA_FILE"),
    ({"ETCD_SERVER_NAME": "etcd.internal"}, "ETCD_SERVER_NAME needs ETCD_CA_FILE"),
    ({"ETCD_USER": "deltarec"}, "ETCD_USER and ETCD_PASSWORD"),
    ({"ETCD_PASSWORD": "x"}, "ETCD_USER and ETCD_PASSWORD"),
    ({"ETCD_CA_FILE": "{missing}"}, "ETCD_CA_FILE="),
    ({"ETCD_CA_FILE": "{password}"}, "ETCD_CA_FILE"),                        # not a PEM certificate
    ({"ETCD_CA_FILE": "{ca}", "ETCD_CERT_FILE": "{cert}", "ETCD_KEY_FILE": "{other_key}"},
     "ETCD_KEY_FILE"),                                                       # not the certificate's key
    ({"ETCD_SERVER_NAME": "bad name!", "ETCD_CA_FILE": "{ca}"}, "ETCD_SERVER_NAME"),
])
def test_inconsistent_or_unusable_settings_are_refused_naming_the_variable(files, environ, message):
    assert message in error_of({key: value.format(**files) for key, value in environ.items()})


def test_a_complete_setting_with_the_password_from_a_file(files):
    config = load(CommonConfig, {"DATABASE_URL": "postgresql+psycopg2://u@h/d", "ETCD_CA_FILE": files["ca"],
                                 "ETCD_CERT_FILE": files["cert"], "ETCD_KEY_FILE": files["key"],
                                 "ETCD_USER": "deltarec", "ETCD_PASSWORD_FILE": files["password"]})
    access = EtcdAccess.from_config(config)
    assert access.tls and access.user == "deltarec" and access.password == "s3cret-etcd-password"
    # Making the client needs no etcd (authentication is lazy): services start during an outage.
    client = Etcd.from_config(config, timeout_s=1)
    assert client.access == access and client._token is None
    client.close()


def test_every_service_makes_its_etcd_client_from_its_config():
    """The one place: no service builds an etcd client from loose endpoint/prefix values."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[2] / "services"
    loose = [str(path.relative_to(root)) for path in root.rglob("*.py")
             if re.search(r"\bEtcd\((?!\s*\))", path.read_text()) and path.name != "etcd.py"]
    assert not loose, f"Etcd(...) built outside Etcd.from_config: {loose}"
    assert "etcd3.client(" not in (root / "common" / "etcd.py").read_text()
