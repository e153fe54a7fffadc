"""deploy/kubernetes: the manifests parse and agree with each other and with the
gateway (no cluster here): every selector selects its pods' labels, every named port
exists, every Secret, ConfigMap and volume a pod uses is defined with that key, the
gateway's `hoop_state` URL names the PostgreSQL Service's host, port, user and
database, `hoop serve` accepts the arguments, and the ConfigMap's policy loads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hoop_addon.cli.main import parser
from hoop_addon.policy.loader import load_policy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the kustomization's resources, by (kind, name)."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / resource).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def test_every_file_is_a_resource_of_the_kustomization() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}


def test_selectors_ports_secrets_and_volumes_agree() -> None:
    objects = manifests()
    workloads = [o for (kind, _), o in objects.items() if kind in ("Deployment", "StatefulSet")]
    assert {o["metadata"]["name"] for o in workloads} == {"hoop-gateway", "hoop-state"}
    for workload in workloads:
        spec, pod = workload["spec"], workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        volumes |= {c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])}
        for container in pod["spec"]["containers"]:
            env = [e["name"] for e in container.get("env", [])]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount
                for var in re.findall(r"\$\((\w+)\)", mount.get("subPathExpr", "")):
                    assert var in env
            for i, item in enumerate(container.get("env", [])):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in objects[("Secret", ref["name"])]["stringData"], ref
                for var in re.findall(r"\$\((\w+)\)", item.get("value", "")):
                    assert var in env[:i], f"{var} must be defined before {item['name']}"
        for volume in volumes.values():
            if "secret" in volume:
                data = objects[("Secret", volume["secret"]["secretName"])]["stringData"]
                assert all(i["key"] in data for i in volume["secret"]["items"])
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in objects
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects
    for (kind, name), service in objects.items():
        if kind != "Service":
            continue
        selected = [w for w in workloads if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert [w["metadata"]["name"] for w in selected] == [name], f"Service {name} selects {selected}"
        ports = {p["name"]: p["containerPort"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    assert objects[("StatefulSet", "hoop-state")]["spec"]["serviceName"] == "hoop-state"


def gateway_container() -> dict[str, Any]:
    (container,) = manifests()[("Deployment", "hoop-gateway")]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_state_url_names_the_postgresql_service() -> None:
    objects = manifests()
    env = {e["name"]: e for e in gateway_container()["env"]}
    url = env["HOOP_STATE_URL"]["value"]
    match = re.fullmatch(r"postgresql://(\w+):\$\(HOOP_STATE_PASSWORD\)@([\w-]+):(\d+)/(\w+)", url)
    assert match, url
    user, host, port, database = match.groups()
    service = objects[("Service", host)]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    (postgres,) = objects[("StatefulSet", host)]["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in postgres["env"]}
    assert (pg_env["POSTGRES_USER"]["value"], pg_env["POSTGRES_DB"]["value"]) == (user, database)
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"] == env["HOOP_STATE_PASSWORD"]["valueFrom"]


def test_hoop_serve_takes_the_arguments_and_the_listen_port_is_the_proxy_port() -> None:
    container = gateway_container()
    assert container["command"] == ["hoop", "serve"]
    args, extra = parser().parse_known_args(["serve", *container["args"]])
    assert extra == ["--set", "hoop_state=$(HOOP_STATE_URL)", "--set", "hoop_mask_secret=env:HOOP_MASK_SECRET"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.listen_port == ports["proxy"] and args.listen_host == "0.0.0.0"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (args.rules, args.confdir, str(Path(args.signing_key).parent), args.recordings):
        assert path in mounts, path
    assert "8081" in " ".join(container["readinessProbe"]["exec"]["command"]) and args.control == "127.0.0.1:8081"


def test_the_configmap_policy_loads(tmp_path: Path) -> None:
    for name, text in manifests()[("ConfigMap", "hoop-rules")]["data"].items():
        (tmp_path / name).write_text(text)
    policy = load_policy(tmp_path, resolve_env=False)
    assert [r.name for r in policy.routes] == ["openai"] and [lim.name for lim in policy.limits] == ["per-agent"]
