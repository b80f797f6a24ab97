"""``deploy/k8s`` (Kustomize base, TLS component, single-gpu and multi-gpu overlays).

Each overlay is rendered with ``kubectl kustomize`` (Debian ``kubectl``), and every rendered object is
validated with ``kubernetes-validate`` (PyPI; the Kubernetes OpenAPI schemas, strict: unknown fields
are errors) for the oldest and newest Kubernetes versions we support. Then the objects are checked
against each other: selectors match pod labels, every referenced ConfigMap/Secret/PVC/Service is in
the render, ports and probes agree with the command lines, every container has resource requests
and passes the Pod Security "restricted" profile, and the site configuration files load with the
package's own loaders. The multi-gpu overlay is rendered with certificates from
``deploy/k8s/make-certs.sh`` (openssl), and without them it fails naming the missing file.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.support import REPO
from tests.support.cli_options import cli_options
from tests.support.system_tools import require

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # gRPC probes are GA from 1.27
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def _kubectl() -> str:
    require("kubectl")
    return shutil.which("kubectl")  # type: ignore[return-value]  # present: require passed


def render(overlay: Path) -> list[dict]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = tmp_path_factory.mktemp("certs")
    proc = subprocess.run(
        ["bash", str(K8S / "make-certs.sh"), str(out), "medgemma", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory, certificates) -> Path:
    """The deploy/k8s tree with the multi-gpu overlay's TLS files in place, as a site would have it."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.crt", "*.key", "*.pem"))
    tls = copy / "overlays" / "multi-gpu" / "tls"
    for name in ("ca.crt", "worker.crt", "worker.key", "listener.crt", "listener.key"):
        shutil.copy2(certificates / name, tls / name)
    return copy


@pytest.fixture(scope="module", params=["single-gpu", "multi-gpu"])
def overlay(request, k8s_copy) -> tuple[str, list[dict]]:
    return request.param, render(k8s_copy / "overlays" / request.param)


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = objects(docs, kind)
    assert name in found, f"no {kind} {name} in the render"
    return found[name]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    return pod_spec(workload)["containers"][0]


def option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def environment(docs: list[dict], workload: dict) -> dict[str, str]:
    """The container's environment: ``envFrom`` ConfigMaps, then ``env`` values on top."""
    config_maps = objects(docs, "ConfigMap")
    spec = container(workload)
    values: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        values.update(config_maps[source["configMapRef"]["name"]]["data"])
    values.update({item["name"]: item["value"] for item in spec.get("env", []) if "value" in item})
    return values


def listener_setting(docs: list[dict], listener: dict, name: str) -> str:
    """A listener option as the listener resolves it: ``--name`` flag, else ``MEDGEMMA_LISTENER_NAME``."""
    args = container(listener)["args"]
    flag = "--" + name.replace("_", "-")
    if flag in args:
        return option(args, flag)
    variable = "MEDGEMMA_LISTENER_" + name.upper()
    env = environment(docs, listener)
    assert variable in env, f"the listener gets neither {flag} nor {variable}"
    return env[variable]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


# ---- rendering and schemas --------------------------------------------------------------------


def test_the_overlays_render_namespaced(overlay):
    name, docs = overlay
    kinds = {doc["kind"] for doc in docs}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "medgemma", f"{name}: {doc['kind']} without namespace"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(overlay, version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed"
    )
    name, docs = overlay
    failures = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not failures, f"{name} on Kubernetes {version}:\n" + "\n".join(failures)


def test_the_validator_rejects_a_bad_object(overlay):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed"
    )
    worker = one(overlay[1], "Deployment", "medgemma-worker")
    broken = yaml.safe_load(yaml.safe_dump(worker))
    container(broken)["resources"]["requests"]["memory"] = ["24Gi"]  # wrong type
    container(broken)["readinessProbe"]["grpcc"] = {"port": 50051}  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_multi_gpu_without_certificates_fails_naming_the_file(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.crt", "*.key", "*.pem"))
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(copy / "overlays" / "multi-gpu")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "tls/worker.crt" in proc.stderr and "no such file" in proc.stderr


def test_the_repository_ships_no_keys():
    assert not [p for p in K8S.rglob("*") if p.suffix in (".key", ".pem")], "private keys in deploy/k8s"


# ---- the worker -------------------------------------------------------------------------------


def test_worker_requests_a_gpu_and_probes_grpc_health(overlay):
    docs = overlay[1]
    worker = one(docs, "Deployment", "medgemma-worker")
    spec = container(worker)
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["resources"]["requests"]["nvidia.com/gpu"] == 1
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    assert int(option(spec["args"], "--listen").rsplit(":", 1)[1]) == ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        definition = spec[probe]
        if "grpc" in definition:
            assert definition["grpc"]["port"] == ports["grpc"], probe
        else:  # TLS: Kubernetes' gRPC probe cannot do TLS; the healthcheck script presents a certificate
            command = definition["exec"]["command"]
            assert "grpc" in command and command[command.index("grpc") + 1] == f"127.0.0.1:{ports['grpc']}"
            assert "--ca" in command and "--cert" in command, probe
    assert spec["startupProbe"]["failureThreshold"] * spec["startupProbe"]["periodSeconds"] >= 300
    env = {item["name"]: item.get("value") for item in spec["env"]}
    assert env["MEDGEMMA_DEPLOY_DEVICE"] == "cuda"
    assert "--require-all-models" in spec["args"], "a missing model must stop the worker, not halve it"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(worker)["tolerations"])
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert (
        int(annotations["prometheus.io/port"])
        == int(option(spec["args"], "--metrics-port"))
        == ports["metrics"]
    )
    # A rolling update must not need a second GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_worker_models_are_a_read_only_volume(overlay):
    docs = overlay[1]
    worker = one(docs, "Deployment", "medgemma-worker")
    volumes = {v["name"]: v for v in pod_spec(worker)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(worker)["volumeMounts"]}
    models_dir = str(Path(option(container(worker)["args"], "--medsiglip")).parent)
    mount = mounts[models_dir]
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert "ReadOnlyMany" in pvc["spec"]["accessModes"]


def test_headless_service_balances_over_ready_workers(overlay):
    docs = overlay[1]
    worker = one(docs, "Deployment", "medgemma-worker")
    listener = one(docs, "StatefulSet", "medgemma-listener")
    backend = listener_setting(docs, listener, "backend")
    found = re.fullmatch(r"grpcs?://([\w-]+):(\d+)", backend)
    assert found, backend
    service = one(docs, "Service", found.group(1))
    assert service["spec"]["clusterIP"] == "None", "client-side balancing needs a headless Service"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert matches(
        {"matchLabels": service["spec"]["selector"]}, worker["spec"]["template"]["metadata"]["labels"]
    )
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert ports[int(found.group(2))]["targetPort"] == "grpc"


def test_multi_gpu_runs_several_tls_workers(k8s_copy, certificates):
    docs = render(k8s_copy / "overlays" / "multi-gpu")
    worker = one(docs, "Deployment", "medgemma-worker")
    assert worker["spec"]["replicas"] >= 2
    args = container(worker)["args"]
    secrets = objects(docs, "Secret")
    mounts = {m["name"]: m["mountPath"] for m in container(worker)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(worker)["volumes"]}
    tls_secret = secrets[volumes["tls"]["secret"]["secretName"]]
    assert tls_secret["type"] == "kubernetes.io/tls"
    for flag in ("--tls-cert", "--tls-key", "--client-ca"):
        path = Path(option(args, flag))
        assert str(path.parent) == mounts["tls"] and path.name in tls_secret["data"], flag
    # The certificate in the Secret is valid for the name clients dial.
    cert = base64.b64decode(tls_secret["data"]["tls.crt"])
    with tempfile.NamedTemporaryFile(suffix=".crt") as handle:
        handle.write(cert)
        handle.flush()
        san = subprocess.run(
            ["openssl", "x509", "-in", handle.name, "-noout", "-ext", "subjectAltName"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    listener = one(docs, "StatefulSet", "medgemma-listener")
    backend = listener_setting(docs, listener, "backend")
    found = re.fullmatch(r"grpcs://([\w-]+):\d+", backend)
    assert found, f"the listener must dial the TLS workers with grpcs://, not {backend}"
    assert f"DNS:{found.group(1)}" in san
    # The listener presents its own client certificate, named by the variables the client reads.
    listener_mounts = {m["name"]: m["mountPath"] for m in container(listener)["volumeMounts"]}
    listener_volumes = {v["name"]: v for v in pod_spec(listener)["volumes"]}
    listener_secret = secrets[listener_volumes["tls"]["secret"]["secretName"]]
    assert {"tls.crt", "tls.key", "ca.crt"} <= set(listener_secret["data"])
    env = environment(docs, listener)
    for variable in ("MEDGEMMA_DEPLOY_TLS_CA", "MEDGEMMA_DEPLOY_TLS_CERT", "MEDGEMMA_DEPLOY_TLS_KEY"):
        path = Path(env[variable])
        assert str(path.parent) == listener_mounts["tls"] and path.name in listener_secret["data"], variable


def test_plaintext_workers_say_so_and_sit_behind_the_network_policy(overlay):
    docs = overlay[1]
    args = container(one(docs, "Deployment", "medgemma-worker"))["args"]
    tls = all(flag in args for flag in ("--tls-cert", "--tls-key", "--client-ca"))
    # The worker refuses plaintext on a non-loopback address unless told the network is trusted.
    assert tls or "--allow-insecure" in args
    if not tls:
        assert "medgemma-worker" in objects(docs, "NetworkPolicy")
        listener = one(docs, "StatefulSet", "medgemma-listener")
        assert listener_setting(docs, listener, "backend").startswith("grpc://")


# ---- the listener -----------------------------------------------------------------------------


def test_listener_spools_to_its_own_persistent_volume(overlay):
    docs = overlay[1]
    listener = one(docs, "StatefulSet", "medgemma-listener")
    spool = option(container(listener)["args"], "--spool")
    mounts = {m["mountPath"]: m["name"] for m in container(listener)["volumeMounts"]}
    templates = {t["metadata"]["name"] for t in listener["spec"]["volumeClaimTemplates"]}
    assert mounts[spool] in templates
    governing = one(docs, "Service", listener["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert matches(
        {"matchLabels": governing["spec"]["selector"]}, listener["spec"]["template"]["metadata"]["labels"]
    )


def test_listener_site_settings_resolve(overlay):
    docs = overlay[1]
    listener = one(docs, "StatefulSet", "medgemma-listener")
    spec = container(listener)
    for destination in listener_setting(docs, listener, "destination").split(","):
        assert re.fullmatch(r"[A-Z0-9_ -]{1,16}@[\w.-]+:\d+", destination.strip()), destination
    assert listener_setting(docs, listener, "pipeline") in ("classify", "report", "study")
    assert re.fullmatch(r"[A-Z0-9_ -]{1,16}", listener_setting(docs, listener, "ae_title"))
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert int(listener_setting(docs, listener, "port")) == ports["dicom"]
    assert int(listener_setting(docs, listener, "metrics_port")) == ports["metrics"]
    annotations = listener["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    service = one(docs, "Service", "medgemma-listener")
    assert service["spec"]["ports"][0]["targetPort"] == "dicom"
    # The readiness probe echoes the AE title the listener answers to.
    probe = " ".join(spec["readinessProbe"]["exec"]["command"])
    assert "${MEDGEMMA_LISTENER_AE_TITLE}@127.0.0.1:" + str(ports["dicom"]) in probe


# ---- whole-render consistency -----------------------------------------------------------------


def _workloads(docs: list[dict]) -> list[dict]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def test_every_reference_resolves_in_the_render(overlay):
    docs = overlay[1]
    config_maps, secrets = objects(docs, "ConfigMap"), objects(docs, "Secret")
    claims = objects(docs, "PersistentVolumeClaim")
    accounts = objects(docs, "ServiceAccount")
    for workload in _workloads(docs):
        spec = pod_spec(workload)
        assert spec["serviceAccountName"] in accounts
        assert spec["automountServiceAccountToken"] is False
        names = {v["name"] for v in spec["volumes"]}
        names |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, volume
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, volume
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        for item in spec["containers"]:
            for mount in item.get("volumeMounts", []):
                assert mount["name"] in names, mount


def test_every_container_has_requests_and_a_memory_limit(overlay):
    for workload in _workloads(overlay[1]):
        for item in pod_spec(workload)["containers"]:
            resources = item["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), workload["metadata"]["name"]
            assert "memory" in resources["limits"], workload["metadata"]["name"]


def test_pods_meet_the_restricted_pod_security_profile(overlay):
    docs = overlay[1]
    namespace = next(doc for doc in docs if doc["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in _workloads(docs):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for item in spec["containers"]:
            context = item["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["readOnlyRootFilesystem"] is True
            assert ":" in item["image"] and not item["image"].endswith(":latest")


def test_disruption_budgets_and_network_policies_select_real_pods(overlay):
    docs = overlay[1]
    pod_labels = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs)
    }
    budgets = objects(docs, "PodDisruptionBudget")
    assert set(budgets) == set(pod_labels)
    for budget in budgets.values():
        assert sum(matches(budget["spec"]["selector"], labels) for labels in pod_labels.values()) == 1
    policies = objects(docs, "NetworkPolicy")
    assert policies["medgemma-default-deny"]["spec"]["podSelector"] == {}
    worker_policy = policies["medgemma-worker"]
    assert matches(worker_policy["spec"]["podSelector"], pod_labels["medgemma-worker"])
    grpc_rule = next(
        rule for rule in worker_policy["spec"]["ingress"] if any(p["port"] == 50051 for p in rule["ports"])
    )
    callers = [peer["podSelector"] for peer in grpc_rule["from"]]
    assert any(matches(selector, pod_labels["medgemma-listener"]) for selector in callers)
    assert not any(matches(selector, pod_labels["medgemma-worker"]) for selector in callers)
    # The worker talks to nothing but DNS: no route to the internet for a process holding the models.
    for rule in worker_policy["spec"]["egress"]:
        assert {p["port"] for p in rule["ports"]} == {53}


# ---- site configuration in the ConfigMaps -----------------------------------------------------


def _mounted_file(docs: list[dict], workload: dict, path: str) -> str:
    """The content of ``path`` inside ``workload``'s container, from the ConfigMap mounted there."""
    config_maps = objects(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    for mount in container(workload)["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/") and "configMap" in volumes[mount["name"]]:
            key = path[len(mount["mountPath"]) + 1 :]
            data = config_maps[volumes[mount["name"]]["configMap"]["name"]]["data"]
            assert key in data, f"{path}: no key {key} in the mounted ConfigMap"
            return data[key]
    raise AssertionError(f"{path} is not inside a ConfigMap mount of {workload['metadata']['name']}")


def _env(workload: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(workload).get("env", []) if "value" in item}


def test_settings_file_resolves_with_the_package_settings(overlay, tmp_path):
    from medgemma_deploy.settings import CONFIG_ENV, resolve_settings

    docs = overlay[1]
    for workload in _workloads(docs):
        path = _env(workload)[CONFIG_ENV]
        settings_file = tmp_path / f"{workload['metadata']['name']}-settings.yaml"
        settings_file.write_text(_mounted_file(docs, workload, path))
        from_file = yaml.safe_load(settings_file.read_text())
        assert from_file, f"{path}: the mounted settings file sets nothing"
        settings = resolve_settings({}, environ={CONFIG_ENV: str(settings_file)})
        # The same values given as flags resolve to the same settings: every key of the file was read.
        assert settings == resolve_settings(from_file, environ={})


def _variables_the_package_reads() -> set[str]:
    """Every ``MEDGEMMA_DEPLOY_*`` name written as a string in the package, plus the listener's
    ``MEDGEMMA_LISTENER_<OPTION>`` for each of its options."""
    from medgemma_deploy.settings import CONFIG_ENV, SETTINGS_TABLE

    known = {env_var for env_var, _default in SETTINGS_TABLE.values()} | {CONFIG_ENV}
    for folder in ("medgemma_deploy", "operators", "apps"):
        for path in (REPO / folder).rglob("*.py"):
            known |= set(re.findall(r"[\"'](MEDGEMMA_DEPLOY_[A-Z0-9_]+)[\"']", path.read_text()))
    import argparse

    from medgemma_deploy.cli.listen import ENV_PREFIX, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    known |= {ENV_PREFIX + action.dest.upper() for action in parser._actions if action.option_strings}
    return known


def test_project_variables_in_the_manifests_are_ones_the_package_reads(overlay):
    docs = overlay[1]
    used = {
        name
        for workload in _workloads(docs)
        for name in environment(docs, workload)
        if name.startswith(("MEDGEMMA_DEPLOY_", "MEDGEMMA_LISTENER_"))
    }
    assert {"MEDGEMMA_DEPLOY_DEVICE", "MEDGEMMA_LISTENER_DESTINATION"} <= used
    unknown = used - _variables_the_package_reads()
    assert not unknown, f"the package reads none of {sorted(unknown)}: a silent misconfiguration"


def test_label_sets_in_the_config_map_load(overlay, tmp_path):
    from medgemma_deploy.operators.medsiglip.labels import load_label_sets

    docs = overlay[1]
    listener = one(docs, "StatefulSet", "medgemma-listener")
    files = []
    for path in _env(listener)["MEDGEMMA_DEPLOY_LABELS"].split(os.pathsep):
        target = tmp_path / Path(path).name
        target.write_text(_mounted_file(docs, listener, path))
        files.append(target)
    label_sets = load_label_sets(files)
    assert label_sets and all(label_set.findings for label_set in label_sets)


def test_prompts_in_the_config_map_load(overlay, tmp_path):
    from medgemma_deploy.operators.medgemma.prompts import PromptBook

    docs = overlay[1]
    listener = one(docs, "StatefulSet", "medgemma-listener")
    path = environment(docs, listener)["MEDGEMMA_DEPLOY_PROMPTS"]
    target = tmp_path / Path(path).name
    target.write_text(_mounted_file(docs, listener, path))
    mounted, packaged = PromptBook.load(target), PromptBook.load(None)
    assert (mounted.version, mounted.families) == (packaged.version, packaged.families)


def test_prompts_config_map_starts_as_the_packaged_prompts():
    packaged = REPO / "medgemma_deploy" / "config" / "prompts.yaml"
    shipped = K8S / "base" / "config" / "prompts" / "prompts.yaml"
    assert shipped.read_text() == packaged.read_text(), (
        "deploy/k8s/base/config/prompts/prompts.yaml differs from medgemma_deploy/config/prompts.yaml: "
        "copy it again (site changes belong in an overlay)"
    )


def test_label_set_config_map_starts_as_the_packaged_sets():
    packaged = REPO / "medgemma_deploy" / "config" / "labels"
    shipped = K8S / "base" / "config" / "labels"
    packaged_files = {p.name: p.read_text() for p in packaged.glob("*.yaml")}
    shipped_files = {p.name: p.read_text() for p in shipped.glob("*.yaml")}
    assert packaged_files, "no packaged label sets found: the comparison is broken"
    assert set(shipped_files) == set(packaged_files), "deploy/k8s/base/config/labels lists other files"
    drifted = sorted(name for name in packaged_files if shipped_files[name] != packaged_files[name])
    assert not drifted, (
        f"deploy/k8s/base/config/labels/{drifted} differ from medgemma_deploy/config/labels/: copy them "
        "again (site changes belong in an overlay)"
    )


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "medgemma-worker"), ("StatefulSet", "medgemma-listener")]
)
def test_manifest_arguments_use_only_flags_the_cli_accepts(k8s_copy, kind, name):
    # multi-gpu carries every flag (TLS included).
    args = container(one(render(k8s_copy / "overlays" / "multi-gpu"), kind, name))["args"]
    subcommand = "worker" if kind == "Deployment" else args[0]
    flags = {arg for arg in args if arg.startswith("--")}
    unknown = flags - cli_options(subcommand)
    assert not unknown, f"{name}: `medgemma-deploy {subcommand}` rejects {sorted(unknown)}"
