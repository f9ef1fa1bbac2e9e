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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import build_parser

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
    from cluster import config as config_mod

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


def test_every_pod_mounts_the_config_and_the_generated_secret(tmp_path: Path) -> None:
    from cluster import config as config_mod

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == "canopy-redis"
    assert generator["options"]["disableNameSuffixHash"]  # pods name the Secret as is
    secret_key = generator["files"][0].split("=")[0]
    (cm,) = _load_yaml_docs(K8S / "configmap.yaml")
    path = tmp_path / "cluster.toml"
    path.write_text(cm["data"]["cluster.toml"])
    password_file = Path(config_mod.load(path).cluster.password_file)
    pods = 0
    for label, resource in _k8s_resources():
        pod = resource.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        pods += 1
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/etc/canopy"]]["configMap"]["name"] == "canopy-config", label
            secret = volumes[mounts[str(password_file.parent)]]["secret"]
            assert secret["secretName"] == "canopy-redis" and password_file.name == secret_key, label
    assert pods == 7  # redis, replay, cache, learner, learner-standby, evaluator, actor


def test_kustomize_build_is_valid(k8s_validate: Any, tmp_path: Path) -> None:
    # Optional: kubectl's built-in kustomize (local, no cluster) renders the whole set,
    # the generated Secret included.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build is not checked")
    build = tmp_path / "k8s"
    shutil.copytree(K8S, build)
    (build / "redis.password").write_text("not-a-real-password\n")
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
