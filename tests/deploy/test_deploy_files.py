"""The deploy files are well formed, offline: compose against the compose-spec JSON schema,
every Kubernetes manifest against the schemas of one Kubernetes release, and every canopy
command they run against the real `canopy` parser.

Schemas come from installed packages (the `test` extra), never the network:
- compose-spec: vendored in check-jsonschema (check_jsonschema/builtin_schemas/vendor/);
- Kubernetes: kubernetes-validate ships per-release JSON schemas.
Where kubectl is installed, `kubectl kustomize` (local, no cluster) also renders
deploy/k8s and every rendered object is validated; without kubectl that test skips.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml
import zmq.auth

from canopy import acl, curve
from canopy import config as config_mod
from canopy.cluster.cli import build_parser
from canopy.redisconn import credentials, read_password

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
# kubernetes-validate 1.37.0 ships schemas for 1.37 and older releases.
K8S_VERSION = "1.37.0"
# Shell words after which the next word is in command position.
SHELL_SEPARATORS = {"exec", "&&", "||", ";", "|", "then", "do", "else", "!", "("}


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_resources() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _load_yaml_docs(path):
            yield f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc


# ---- compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (the compose-spec schema) not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_compose_spec(compose_validator: Any, name: str) -> None:
    data = yaml.safe_load((DEPLOY / name).read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in compose_validator.iter_errors(data)
    ]
    assert not errors, f"{name} breaks the compose spec:\n" + "\n".join(errors)


def test_compose_validator_rejects_a_broken_file(compose_validator: Any) -> None:
    # The schema is strict enough to matter: an unknown service key is an error.
    bad = {"services": {"x": {"image": "canopy:cpu", "comand": ["up"]}}}
    assert list(compose_validator.iter_errors(bad))


# ---- Kubernetes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_validate() -> Any:
    utils = pytest.importorskip(
        "kubernetes_validate.utils", reason="kubernetes-validate (Kubernetes JSON schemas) not installed"
    )
    return utils


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert {"apiVersion", "kind"} <= kustomization.keys()
    assert kustomization["kind"] == "Kustomization"


@pytest.mark.parametrize(
    "label,resource", [pytest.param(label, res, id=label) for label, res in _k8s_resources()]
)
def test_manifest_matches_kubernetes_schema(k8s_validate: Any, label: str, resource: dict[str, Any]) -> None:
    try:
        k8s_validate.validate(resource, K8S_VERSION, strict=True)
    except k8s_validate.ValidationError as exc:
        pytest.fail(f"{label}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")


def test_kubernetes_validator_rejects_a_broken_manifest(k8s_validate: Any) -> None:
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "many", "selector": {}, "template": {"spec": {"containers": []}}},
    }
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(bad, K8S_VERSION, strict=True)


def test_configmap_holds_a_valid_cluster_config(tmp_path: Path) -> None:
    (cm,) = _load_yaml_docs(K8S / "configmap.yaml")
    path = tmp_path / "cluster.toml"
    path.write_text(cm["data"]["cluster.toml"])
    cfg = config_mod.load(path)
    assert cfg.cluster.bind_all
    assert len(cfg.cluster.redis) == cfg.redis.shards
    assert len(cfg.cluster.replay) == cfg.replay.shards
    assert len(cfg.cluster.cache_fetch) == len(cfg.cluster.cache_notify) == cfg.cache.nodes
    # Every host is a StatefulSet pod's DNS name behind its headless Service, and the
    # StatefulSets run exactly the pods the config lists.
    sets = {doc["metadata"]["name"]: doc for _, doc in _k8s_resources() if doc["kind"] == "StatefulSet"}
    services = {doc["metadata"]["name"] for _, doc in _k8s_resources() if doc["kind"] == "Service"}
    for role, addresses in (
        ("redis", cfg.cluster.redis),
        ("replay", cfg.cluster.replay),
        ("cache", cfg.cluster.cache_fetch + cfg.cluster.cache_notify),
    ):
        assert sets[role]["spec"]["serviceName"] == role and role in services
        replicas = sets[role]["spec"]["replicas"]
        hosts = {a.removeprefix("tcp://").rsplit(":", 1)[0] for a in addresses}
        assert hosts == {f"{role}-{i}.{role}" for i in range(replicas)}, role


def _load_config_text(text: str, tmp_path: Path, **cluster: str) -> config_mod.Config:
    """A deploy config, with `cluster` keys (the secrets' paths) redirected."""
    doc = tomllib.loads(text)
    doc["cluster"].update(cluster)
    path = tmp_path / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    return config_mod.load(path)


def _configmap_text() -> str:
    (cm,) = _load_yaml_docs(K8S / "configmap.yaml")
    return cm["data"]["cluster.toml"]


@pytest.mark.parametrize("name", ["cluster.toml (compose)", "configmap.yaml (k8s)"])
def test_deploy_configs_turn_on_curve_and_role_users(name: str, tmp_path: Path) -> None:
    text = (DEPLOY / "cluster.toml").read_text() if "compose" in name else _configmap_text()
    cfg = _load_config_text(text, tmp_path)
    c = cfg.cluster
    assert c.role_users and c.curve_dir and c.password_file, name
    # Both live in the one secrets mount, where canopy-secrets lays them out.
    assert Path(c.curve_dir) == Path(c.password_file).parent / "curve", name
    assert Path(c.password_file).name == "redis.password", name
    assert cfg.redis.persist, f"{name}: the Redis shards keep an append-only file on their volume"


def make_secrets(directory: Path) -> dict[Path, bytes]:
    """Run the keys service's command (canopy-secrets DIR); every file it left, with its bytes."""
    subprocess.run([sys.executable, str(DEPLOY / "make_secrets.py"), str(directory)], check=True, timeout=60)
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_each_roles_split_folder_holds_what_it_reads_and_no_other_roles_secret(tmp_path: Path) -> None:
    from canopy.cluster.redis_server import write_conf

    secrets_dir, out = tmp_path / "secrets", tmp_path / "split"
    argv = [sys.executable, str(DEPLOY / "make_secrets.py"), str(secrets_dir), "--split", str(out)]
    subprocess.run(argv, check=True, timeout=60)
    text = (DEPLOY / "cluster.toml").read_text()
    for role in sorted(set(SERVICE_ROLES.values())):
        seen = out / role
        cfg = _load_config_text(
            text, tmp_path, password_file=str(seen / "redis.password"), curve_dir=str(seen / "curve")
        )
        cfg.run.dir = str(tmp_path / "run" / role)
        names = {p.relative_to(seen).as_posix() for p in seen.rglob("*") if p.is_file()}
        if role == "redis":
            write_conf(cfg, 0)  # every user's password and the TLS server files
            assert not any(n.startswith("curve/") for n in names), "Redis needs no CURVE keys"
            continue
        assert read_password(cfg.cluster, credentials(cfg.cluster, role)[1]), role
        assert curve.load(cfg.cluster, role) is not None, role
        assert "redis.password" not in names and "tls/redis.key" not in names, role
        others = [n for n in names if n.endswith("_secret") and f"/{role}/" not in n and "server/" not in n]
        assert not others, f"{role} holds {others}"
        assert not [n for n in names if n.startswith("curve/server/") and n.endswith("_secret")] or role in (
            "replay",
            "cache",
        ), role
    before = (out / "actor" / "redis.actor.password").read_bytes()
    subprocess.run(argv, check=True, timeout=60)  # a rerun copies again and keeps the secrets
    assert (out / "actor" / "redis.actor.password").read_bytes() == before


def test_canopy_secrets_makes_every_key_once(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    first = make_secrets(secrets_dir)
    assert make_secrets(secrets_dir) == first, "a rerun (every `docker compose up`) keeps what exists"
    cfg = _load_config_text(
        (DEPLOY / "cluster.toml").read_text(),
        tmp_path,
        password_file=str(secrets_dir / "redis.password"),
        curve_dir=str(secrets_dir / "curve"),
    )
    keys = curve.load(cfg.cluster, "replay")
    assert keys is not None and keys.server is not None  # what `canopy keys` makes
    assert sorted(curve.read_allowed(keys.directory).values()) == sorted(curve.CLIENT_ROLES)
    passwords = [read_password(cfg.cluster, credentials(cfg.cluster, role)[1]) for role in acl.ROLES]
    passwords.append(read_password(cfg.cluster))
    assert len(set(passwords)) == len(acl.ROLES) + 1 and all(len(p) >= 24 for p in passwords)
    public = [
        p for p in first if ("curve" in p.parts and not p.name.endswith("_secret")) or p.suffix == ".crt"
    ]
    secret_files = [p for p in first if p not in public]
    assert {p.name for p in first if "tls" in p.parts} == {"ca.crt", "redis.crt", "redis.key"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in secret_files)


def test_the_image_installs_the_deploy_entrypoints() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    allowed = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for script, command in (("scaled.py", "canopy-scaled"), ("make_secrets.py", "canopy-secrets")):
        copy = f"COPY --chmod=755 deploy/{script} /usr/local/bin/{command}"
        assert dockerfile.count(copy) == 2, f"both targets install {command}"
        assert f"!deploy/{script}" in allowed, f"deploy/{script} must enter the build context"


# Compose service -> the role whose secrets folder (canopy-secrets --split) it mounts.
SERVICE_ROLES = {
    "redis0": "redis",
    "redis1": "redis",
    "replay0": "replay",
    "cache0": "cache",
    "learner": "learner",
    "learner-standby": "learner",
    "evaluator": "evaluator",
    "actor": "actor",
}
SPLIT = "/run/secrets/split"


def test_compose_roles_start_after_the_keys_and_mount_only_their_own_secrets_read_only() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    cfg = config_mod.load(DEPLOY / "cluster.toml")
    secrets_dir = str(Path(cfg.cluster.password_file).parent)
    services = compose["services"]
    keys = services.pop("keys")
    assert keys["entrypoint"] == ["canopy-secrets"] and keys["command"] == [secrets_dir, "--split", SPLIT]
    assert keys["restart"] == "no"
    written = {v.split(":")[1]: v.split(":")[0] for v in keys["volumes"]}
    assert written[secrets_dir] == "secrets", "the keys service writes the volume"
    assert set(services) == set(SERVICE_ROLES)
    for name, service in services.items():
        role = SERVICE_ROLES[name]
        assert service["depends_on"]["keys"] == {"condition": "service_completed_successfully"}, name
        assert written[f"{SPLIT}/{role}"] == f"secrets-{role}", name
        mounted = [v for v in service["volumes"] if v.split(":")[1] == secrets_dir]
        assert mounted == [f"secrets-{role}:{secrets_dir}:ro"], name
        assert "./cluster.toml:/etc/canopy/cluster.toml:ro" in service["volumes"], name
    # Each Redis shard's append-only file (run.dir/redis-N) and each replay shard's snapshots
    # (replay.snapshot_dir, under run.dir) on a volume of their own.
    run_dirs = {
        name: v
        for name, service in services.items()
        for v in service["volumes"]
        if v.endswith(f":{cfg.run.dir}")
    }
    stateful = [f"redis{i}" for i in range(cfg.redis.shards)]
    stateful += [f"replay{i}" for i in range(cfg.replay.shards)]
    assert run_dirs == {name: f"{name}:{cfg.run.dir}" for name in stateful}
    assert Path(cfg.run.dir) in Path(cfg.replay.snapshot_dir).parents
    assert {"secrets", *run_dirs} <= compose["volumes"].keys()


def test_compose_runs_a_standby_learner_and_needs_no_compose_v2_keys() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    # Debian's docker-compose 1.29 rejects a top-level `name:` (compose v2 only).
    assert "name" not in compose
    learners = {
        name: service["command"]
        for name, service in compose["services"].items()
        if service.get("command", [None])[0] == "learner"
    }
    assert sorted(learners) == ["learner", "learner-standby"]
    ids = {name: int(cmd[cmd.index("--id") + 1]) for name, cmd in learners.items()}
    assert "--standby" in learners["learner-standby"] and "--standby" not in learners["learner"]
    assert len(set(ids.values())) == 2, "distinct learner ids"
    for name in learners:
        # Either may be the standby after a failover: both are alive while waiting.
        test = compose["services"][name]["healthcheck"]["test"]
        assert "--allow-standby" in test and str(ids[name]) in test, name


def _pod_secret_dir(
    pod: dict[str, Any], container: dict[str, Any], secret_dir: Path, made: Path, seen: Path
) -> Path:
    """Copy into `seen` the files from `made` that the container sees under `secret_dir`."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(secret_dir)]
    assert mount.get("readOnly"), "secrets are mounted read-only"
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "canopy-secrets"
    generator = {
        key: made / src.removeprefix("secrets/")
        for key, _, src in (f.partition("=") for f in _secret_generator()["files"])
    }
    for item in secret["items"]:
        dest = seen / item["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(generator[item["key"]].read_bytes())
    return seen


def _secret_generator() -> dict[str, Any]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    return generator


def test_canopy_secrets_refuses_keys_of_the_old_one_keypair_layout_in_one_line(tmp_path: Path) -> None:
    curve_dir = tmp_path / "secrets" / "curve"
    curve_dir.mkdir(parents=True)
    zmq.auth.create_certificates(curve_dir, "server")
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "make_secrets.py"), str(tmp_path / "secrets")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "old one-keypair layout" in done.stderr


def test_the_secret_holds_what_canopy_secrets_makes(tmp_path: Path) -> None:
    generator = _secret_generator()
    assert generator["name"] == "canopy-secrets"
    assert generator["options"]["disableNameSuffixHash"]  # pods name the Secret as is
    made = make_secrets(tmp_path / "secrets")
    files = {p.relative_to(tmp_path).as_posix() for p in made}
    assert {f.partition("=")[2] for f in generator["files"]} == files


# Pod (workload name) -> the role whose process it runs.
POD_ROLES = {
    "redis": "redis",
    "replay": "replay",
    "cache": "cache",
    "learner": "learner",
    "learner-standby": "learner",
    "evaluator": "evaluator",
    "actor": "actor",
}


def test_every_pod_gets_the_config_and_exactly_the_secrets_its_role_reads(tmp_path: Path) -> None:
    from canopy.cluster.redis_server import write_conf

    text = _configmap_text()
    secret_dir = Path(_load_config_text(text, tmp_path).cluster.password_file).parent
    made = tmp_path / "made" / "secrets"
    make_secrets(made)
    pods = set()
    for label, resource in _k8s_resources():
        pod = resource.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        role = POD_ROLES[resource["metadata"]["name"]]
        pods.add(resource["metadata"]["name"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/etc/canopy"]]["configMap"]["name"] == "canopy-config", label
        # What this pod sees, with the config's paths pointed at it: the role's own
        # user and password, the probes' read-only user, CURVE keys where ZeroMQ is used.
        seen = _pod_secret_dir(
            pod, container, secret_dir, made, tmp_path / "seen" / resource["metadata"]["name"]
        )
        cfg = _load_config_text(
            text,
            tmp_path,
            password_file=str(seen / "redis.password"),
            curve_dir=str(seen / "curve"),
        )
        cfg.run.dir = str(tmp_path / "run")
        if role == "redis":
            write_conf(cfg, 0)  # reads the operator's and every role's password
            assert not (seen / "curve").exists(), f"{label}: Redis needs no CURVE keys"
            continue
        user, path = credentials(cfg.cluster, role)
        assert user == role and read_password(cfg.cluster, path), label
        assert credentials(cfg.cluster, "health")[0] == "status" and read_password(
            cfg.cluster, credentials(cfg.cluster, "health")[1]
        ), f"{label}: the probes run `canopy health` as the status user"
        assert curve.load(cfg.cluster, role) is not None, label
        # Least privilege: no other role's password, and the operator's only for the shards.
        allowed = {f"redis.{role}.password", "redis.status.password", "curve", "tls"}
        assert {p.name for p in seen.iterdir()} <= allowed, label
        # Redis over TLS: every role trusts the CA; only the shards hold the server key.
        assert cfg.cluster.tls and [p.name for p in (seen / "tls").iterdir()] == ["ca.crt"], label
    assert pods == set(POD_ROLES)


def test_redis_pods_keep_their_append_only_file_on_a_claim_of_their_own(tmp_path: Path) -> None:
    cfg = _load_config_text(_configmap_text(), tmp_path)
    (redis,) = [
        r for _, r in _k8s_resources() if r["kind"] == "StatefulSet" and r["metadata"]["name"] == "redis"
    ]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    run_mount = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[cfg.run.dir]
    (claim,) = [c for c in redis["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == run_mount]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert run_mount not in {v["name"] for v in redis["spec"]["template"]["spec"]["volumes"]}, (
        "not an emptyDir"
    )


def test_kustomize_build_is_valid(k8s_validate: Any, tmp_path: Path) -> None:
    # Optional: kubectl's built-in kustomize (local, no cluster) renders the whole set,
    # the generated Secret included.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build is not checked")
    build = tmp_path / "k8s"
    shutil.copytree(K8S, build, ignore=shutil.ignore_patterns("secrets"))
    make_secrets(build / "secrets")
    out = subprocess.run(
        [kubectl, "kustomize", str(build)], capture_output=True, text=True, timeout=60, check=True
    )
    rendered = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds.count("StatefulSet") == 6 and "Secret" in kinds and "Deployment" in kinds
    for doc in rendered:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "canopy"
        k8s_validate.validate(doc, K8S_VERSION, strict=True)


# ---- canopy commands --------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], bool]:
    """The parser's subcommands, and whether one must be given (`canopy cache plan` is optional)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices), bool(action.required)
    return {}, False


def _check_canopy_words(words: list[str], where: str) -> str:
    """The subcommand path at the start of `canopy WORDS...`, e.g. "checkpoint plan"; fails if unknown."""
    parser = build_parser()
    path: list[str] = []
    for word in words:
        choices, required = _subcommands(parser)
        if not choices or (not required and word.startswith("-")):
            break
        assert word in choices, f"{where}: `canopy {' '.join([*path, word])}` is not a canopy subcommand"
        path.append(word)
        parser = choices[word]
    assert path, f"{where}: `canopy` without a subcommand"
    return " ".join(path)


def _commands_in_shell(script: str) -> Iterator[list[str]]:
    """Each simple command of a shell script, as words (good enough for one-liners)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    for i in range(len(words)):
        if i == 0 or words[i - 1] in SHELL_SEPARATORS:
            yield words[i:]


def _canopy_commands_in_argv(argv: list[str], where: str, entrypoint: str | None = None) -> Iterator[str]:
    """Subcommands run by an exec-form command line (entrypoint + argv)."""
    if entrypoint is not None:
        argv = [entrypoint, *argv]
    if not argv:
        return
    if argv[0] == "CMD":  # compose healthcheck, exec form
        argv = argv[1:]
    elif argv[0] == "CMD-SHELL":
        argv = ["sh", "-c", argv[1]]
    if len(argv) >= 3 and argv[0] in ("sh", "bash", "/bin/sh") and argv[1] == "-c":
        for words in _commands_in_shell(argv[2]):
            yield from _canopy_commands_in_argv(words, where)
        return
    if argv[0] == "canopy":
        yield _check_canopy_words(argv[1:], where)
    elif argv[0] == "canopy-scaled":
        # canopy-scaled ROLE ... execs `canopy ROLE --id N ...`
        yield _check_canopy_words(argv[1:2], where)


def _compose_commands() -> Iterator[str]:
    for name in COMPOSE_FILES:
        data = yaml.safe_load((DEPLOY / name).read_text())
        for service, spec in data["services"].items():
            where = f"{name}:{service}"
            entrypoint = spec.get("entrypoint", ["canopy"])  # the image's ENTRYPOINT
            if isinstance(entrypoint, str):
                entrypoint = shlex.split(entrypoint)
            command = spec.get("command")
            if command is not None:
                if isinstance(command, str):
                    command = shlex.split(command)
                yield from _canopy_commands_in_argv([*entrypoint, *command], where)
            test = spec.get("healthcheck", {}).get("test")
            if isinstance(test, str):
                test = ["CMD-SHELL", test]
            if test:
                yield from _canopy_commands_in_argv(test, f"{where} healthcheck")


def _k8s_commands() -> Iterator[str]:
    for label, resource in _k8s_resources():
        pod = resource.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{label}:{container['name']}"
            # No `command`: the image's ENTRYPOINT ["canopy"] runs the args.
            argv = container.get("command", ["canopy"]) + container.get("args", [])
            yield from _canopy_commands_in_argv(argv, where)
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                exec_ = container.get(probe, {}).get("exec")
                if exec_:
                    yield from _canopy_commands_in_argv(exec_["command"], f"{where} {probe}")


def test_compose_runs_only_real_canopy_subcommands() -> None:
    seen = set(_compose_commands())
    # Non-vacuous: the parser walk found the roles and the health checks.
    assert {"redis", "replay", "cache", "learner", "evaluator", "actor", "health"} <= seen


def test_k8s_runs_only_real_canopy_subcommands() -> None:
    seen = set(_k8s_commands())
    assert {"redis", "replay", "cache", "learner", "evaluator", "actor", "health"} <= seen


def test_command_check_catches_an_unknown_subcommand() -> None:
    with pytest.raises(AssertionError, match="not a canopy subcommand"):
        list(_canopy_commands_in_argv(["sh", "-c", "exec canopy lerner --id 0"], "x"))
    with pytest.raises(AssertionError, match="not a canopy subcommand"):
        list(_canopy_commands_in_argv(["canopy-scaled", "actors", "--config", "f"], "x"))
    # `canopy` as a word elsewhere (a Redis user name) is not a command.
    assert not list(_canopy_commands_in_argv(["sh", "-c", "redis-cli --user canopy ping"], "x"))


def test_k8s_ids_come_from_the_pod_ordinal() -> None:
    # Every StatefulSet role derives --id from its hostname's ordinal; no id is hard-coded.
    for label, resource in _k8s_resources():
        if resource["kind"] != "StatefulSet":
            continue
        for container in resource["spec"]["template"]["spec"]["containers"]:
            script = " ".join(container["args"])
            assert '--id "${HOSTNAME##*-}"' in script or '--id "$((1 + ${HOSTNAME##*-}))"' in script, label
