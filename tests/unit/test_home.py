"""One local store per checkout or user: the checkout's .unitoken/ from anywhere inside it, else
~/.unitoken, or UNITOKEN_HOME; the default MLflow store says where it is (issue 37)."""

from pathlib import Path

from unitoken.files import unitoken_home


def test_the_store_follows_the_checkout_not_the_working_directory(tmp_path, monkeypatch, capsys):
    from unitoken.tracking import store as tracking

    monkeypatch.delenv("UNITOKEN_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    checkout = tmp_path / "checkout"
    (checkout / "unitoken").mkdir(parents=True)
    (checkout / "unitoken" / "__init__.py").write_text("")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'unitoken'\n")
    (checkout / "runs" / "deep").mkdir(parents=True)
    monkeypatch.chdir(checkout / "runs" / "deep")
    assert unitoken_home() == checkout / ".unitoken"
    monkeypatch.chdir(tmp_path)  # /tmp-like: not inside a checkout
    assert unitoken_home() == tmp_path / "home" / ".unitoken"
    uri = tracking.default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'home' / '.unitoken' / 'mlflow.db'}"
    assert f"MLflow tracking store: {uri}" in capsys.readouterr().err
    monkeypatch.setenv("UNITOKEN_HOME", str(tmp_path / "shared"))
    assert unitoken_home() == tmp_path / "shared"
    monkeypatch.setenv("UNITOKEN_HOME", ".state")  # relative: against the working directory
    assert unitoken_home() == Path.cwd() / ".state"
