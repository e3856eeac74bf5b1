#!/usr/bin/env python3
"""Checks of the deployment files that no off-the-shelf linter covers (helper of scripts/check-deploy).

    check_deploy.py sync-rules                  copy alerts/genai-task-exporter.rules.yml into the
                                                chart and regenerate the Kubernetes PrometheusRule
    check_deploy.py rules OUT_DIR               the rule copies agree; writes OUT_DIR/*.rules.yml for promtool
    check_deploy.py dockerfile                  image contract (user, port, entrypoint, volume) and .dockerignore
    check_deploy.py compose                     compose file, Prometheus and Grafana provisioning agree
    check_deploy.py dashboards                  dashboards/*.json can be file-provisioned
    check_deploy.py manifests NAME FILE [--external-secret NAME] [--sharded] [--values FILE] [--selftest]
                                                schema (Kubernetes 1.28 and latest, strict) + policy
                                                checks of one rendered set of manifests; --selftest:
                                                the checks reject broken variants of it
    check_deploy.py configs OUT_DIR             writes every example configuration to OUT_DIR
                                                (for check-config) after checking its keys

Exits 1 with one line per problem.
"""

import fnmatch
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ALERTS = "alerts/genai-task-exporter.rules.yml"
CHART_RULES = "charts/genai-task-exporter/files/rules.yml"
K8S_RULE = "deploy/kubernetes/common/prometheusrule.yaml"
COMPOSE_DIR = "deploy/compose"

CONFIG_DIR = "/etc/genai-task-exporter"
CONFIG_FILE = CONFIG_DIR + "/config.yaml"
STATE_DIR = "/var/lib/genai-task-exporter"
UID = 65532
# Kubernetes versions the manifests must be valid for: the oldest the sharded setup supports
# (pod-index label) and the newest the schema package knows.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]

problems = []


def problem(msg):
    problems.append(msg)


def path(rel):
    return os.path.join(ROOT, rel)


def read(rel):
    with open(path(rel), encoding="utf-8") as f:
        return f.read()


def load_all(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


def finish(what):
    if problems:
        for p in problems:
            print(f"  FAIL {what}: {p}")
        sys.exit(1)
    print(f"  ok   {what}")


# ---------------------------------------------------------------------------------------------
# Dockerfile: what hadolint does not know (the image contract) and .dockerignore agreeing with it.

def dockerignore_excludes(rel, patterns):
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or fnmatch.fnmatch(rel.split("/")[0], pat):
            excluded = not neg
    return excluded


def cmd_dockerfile():
    text = read("Dockerfile")
    joined = re.sub(r"\\\n", " ", text)
    ins = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "")
           for l in (x.strip() for x in joined.split("\n")) if l and not l.startswith("#")]
    stages = [a for op, a in ins if op == "FROM"]
    if len(stages) < 2:
        problem("multi-stage build expected")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for image in stages:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image.split()[0])
        name, _, tag = ref.rpartition(":")
        if not name or tag in ("", "latest") or "$" in ref:
            problem(f"FROM {image}: not an exact tag")
    if not re.match(r"rust:\d+\.\d+\.\d+-", re.sub(r"\$\{RUST_VERSION\}", args.get("RUST_VERSION", ""), stages[0])):
        problem("builder must be an exact rust:X.Y.Z-<debian> tag")
    final_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    last = dict(final_stage)  # the last occurrence of each instruction in the runtime stage
    expect = {
        "USER": "65532:65532",
        "EXPOSE": "9850",
        "ENTRYPOINT": '["/usr/local/bin/genai-task-exporter"]',
        "CMD": '["--config.file=/etc/genai-task-exporter/config.yaml"]',
        "VOLUME": '["/var/lib/genai-task-exporter"]',
    }
    for op, want in expect.items():
        if last.get(op) != want:
            problem(f"final stage: {op} {last.get(op)!r}, expected {want!r}")
    if "cargo build --release --locked" not in joined:
        problem("the binary must be built with cargo build --release --locked")
    patterns = [l.strip() for l in read(".dockerignore").split("\n") if l.strip() and not l.startswith("#")]
    for op, a in ins:
        if op == "COPY" and "--from=" not in a:
            for src in a.split()[:-1]:
                if not src.startswith("--") and dockerignore_excludes(src.rstrip("/"), patterns):
                    problem(f"COPY {src}: excluded by .dockerignore")
    for rel in ("target", "data", ".git", "deploy"):
        if not dockerignore_excludes(rel, patterns):
            problem(f".dockerignore lets {rel}/ into the build context")
    finish("Dockerfile keeps the image contract; .dockerignore agrees with its COPYs")


# ---------------------------------------------------------------------------------------------
# Rules: one source (alerts/), two copies (chart file, Kubernetes PrometheusRule).

def render_prometheus_rule(rules_text):
    body = "\n".join(("  " + line) if line.strip() else "" for line in rules_text.rstrip("\n").split("\n"))
    return (
        f"# Generated from {CHART_RULES} (a copy of {ALERTS}) by\n"
        "# `scripts/check-deploy --sync-rules`: edit the rules there, not here.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: genai-task-exporter\n"
        "  labels:\n"
        "    app.kubernetes.io/name: genai-task-exporter\n"
        "    app.kubernetes.io/component: exporter\n"
        "    # Many Prometheus installs select rules by label, e.g. kube-prometheus-stack:\n"
        "    # release: kube-prometheus-stack\n"
        "spec:\n"
        f"{body}\n"
    )


def cmd_sync_rules():
    if os.path.exists(path(ALERTS)):
        with open(path(CHART_RULES), "w", encoding="utf-8") as f:
            f.write(read(ALERTS))
        print(f"  copied {ALERTS} -> {CHART_RULES}")
    else:
        print(f"  {ALERTS} does not exist (yet): keeping {CHART_RULES}")
    with open(path(K8S_RULE), "w", encoding="utf-8") as f:
        f.write(render_prometheus_rule(read(CHART_RULES)))
    print(f"  wrote {K8S_RULE}")


def cmd_rules(out_dir):
    chart = read(CHART_RULES)
    if os.path.exists(path(ALERTS)):
        if read(ALERTS) != chart:
            problem(f"{CHART_RULES} differs from {ALERTS}: run scripts/check-deploy --sync-rules")
        src = ALERTS
    else:
        print(f"  note {ALERTS} does not exist yet: checking the copies against {CHART_RULES}")
        src = CHART_RULES
    if read(K8S_RULE) != render_prometheus_rule(chart):
        problem(f"{K8S_RULE} is not generated from {CHART_RULES}: run scripts/check-deploy --sync-rules")
    rule = yaml.safe_load(read(K8S_RULE))
    if rule.get("spec", {}).get("groups") != yaml.safe_load(read(src)).get("groups"):
        problem(f"{K8S_RULE} spec.groups differ from the groups of {src}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "chart.rules.yml"), "w", encoding="utf-8") as f:
        f.write(chart)
    with open(os.path.join(out_dir, "prometheusrule.rules.yml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, f, sort_keys=False)
    finish("rule copies agree")


# ---------------------------------------------------------------------------------------------
# Compose: the three services, their pinned images, and that Prometheus and Grafana point at
# what compose actually runs and mounts.

def pinned(image):
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def cmd_compose():
    compose = yaml.safe_load(read(f"{COMPOSE_DIR}/docker-compose.yml"))
    services = compose.get("services", {})
    for want in ("exporter", "prometheus", "grafana"):
        if want not in services:
            problem(f"service {want!r} missing")
    if problems:
        finish("compose")
    exporter, prom, graf = services["exporter"], services["prometheus"], services["grafana"]

    for name in ("prometheus", "grafana"):
        if not pinned(services[name].get("image", "")):
            problem(f"service {name}: image {services[name].get('image')!r} has no exact tag")
    if exporter.get("build", {}).get("context") != "../.." or exporter.get("build", {}).get("dockerfile") != "Dockerfile":
        problem("exporter must be built from the repository's Dockerfile (context ../..)")
    want_cmd = ["demo", "--web.listen-address=0.0.0.0:9850", "--simulator.listen-address=0.0.0.0:9851"]
    if exporter.get("command") != want_cmd:
        problem(f"exporter command {exporter.get('command')} != {want_cmd}")
    if not any(str(v).endswith(":" + STATE_DIR) for v in exporter.get("volumes", [])):
        problem(f"exporter: no volume on {STATE_DIR}")

    def mounts(service):
        out = {}
        for v in service.get("volumes", []):
            parts = str(v).split(":")
            out[parts[1]] = parts[0]
        return out

    # Prometheus: its config file, the rules directory, and the scrape target.
    pm = mounts(prom)
    cfg_src = pm.get("/etc/prometheus/prometheus.yml")
    if cfg_src != "./prometheus/prometheus.yml":
        problem("prometheus: ./prometheus/prometheus.yml must be mounted at /etc/prometheus/prometheus.yml")
    if pm.get("/etc/prometheus/rules") != "../../alerts":
        problem("prometheus: ../../alerts must be mounted at /etc/prometheus/rules")
    pcfg = yaml.safe_load(read(f"{COMPOSE_DIR}/prometheus/prometheus.yml"))
    rule_globs = [os.path.join("/etc/prometheus", g) for g in pcfg.get("rule_files", [])]
    rules_in_container = "/etc/prometheus/rules/" + os.path.basename(ALERTS)
    if not any(fnmatch.fnmatch(rules_in_container, g) for g in rule_globs):
        problem(f"prometheus rule_files {pcfg.get('rule_files')} do not load {rules_in_container}")
    targets = [t for sc in pcfg.get("scrape_configs", []) for s in sc.get("static_configs", []) for t in s.get("targets", [])]
    if "exporter:9850" not in targets:
        problem(f"prometheus does not scrape exporter:9850 (targets: {targets})")

    # Grafana: provisioning mounted, datasource URL is the prometheus service, dashboards path mounted.
    gm = mounts(graf)
    if gm.get("/etc/grafana/provisioning") != "./grafana/provisioning":
        problem("grafana: ./grafana/provisioning must be mounted at /etc/grafana/provisioning")
    ds_dir = f"{COMPOSE_DIR}/grafana/provisioning/datasources"
    datasources = [d for f in sorted(os.listdir(path(ds_dir))) for d in yaml.safe_load(read(f"{ds_dir}/{f}")).get("datasources", [])]
    proms = [d for d in datasources if d.get("type") == "prometheus"]
    if len(proms) != 1 or proms[0].get("url") != "http://prometheus:9090" or not proms[0].get("isDefault"):
        problem("grafana: exactly one default prometheus datasource with url http://prometheus:9090 expected")
    db_dir = f"{COMPOSE_DIR}/grafana/provisioning/dashboards"
    providers = [p for f in sorted(os.listdir(path(db_dir))) for p in yaml.safe_load(read(f"{db_dir}/{f}")).get("providers", [])]
    for p in providers:
        dpath = p.get("options", {}).get("path")
        if gm.get(dpath) != "../../dashboards":
            problem(f"grafana dashboard provider path {dpath} is not the mount of ../../dashboards")
    home = graf.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        rel = os.path.join("dashboards", os.path.relpath(home, "/var/lib/grafana/dashboards"))
        if not os.path.exists(path(rel)):
            print(f"  note {rel} (Grafana home dashboard) does not exist yet")

    # Every host path the compose file mounts exists, except the directories other work fills.
    for service in services.values():
        for container, src in mounts(service).items():
            if src.startswith(".") and not os.path.exists(path(os.path.join(COMPOSE_DIR, src))):
                if src in ("../../alerts", "../../dashboards"):
                    print(f"  note {os.path.normpath(os.path.join(COMPOSE_DIR, src))} does not exist yet")
                else:
                    problem(f"mount source {src} does not exist")
    finish("compose, prometheus and grafana provisioning agree")


def cmd_dashboards():
    ddir = path("dashboards")
    files = sorted(f for f in os.listdir(ddir) if f.endswith(".json")) if os.path.isdir(ddir) else []
    if not files:
        print("  note dashboards/*.json do not exist yet")
    for f in files:
        with open(os.path.join(ddir, f), encoding="utf-8") as fh:
            d = json.load(fh)
        # Grafana's file provisioning ignores __inputs: a ${DS_PROMETHEUS} reference anywhere
        # else stays unresolved ("Datasource ${DS_PROMETHEUS} was not found"). Panels must go
        # through the `datasource` template variable.
        var_names = {v.get("name") for v in d.get("templating", {}).get("list", [])}

        def walk(node, where):
            if isinstance(node, dict):
                for k, v in node.items():
                    if where == "" and k == "__inputs":
                        continue
                    if k == "current" and where.startswith("templating"):
                        continue
                    walk(v, f"{where}.{k}" if where else k)
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")
            elif isinstance(node, str) and "DS_PROMETHEUS" in node and "DS_PROMETHEUS" not in var_names:
                problem(f"dashboards/{f}: {where} = {node!r} cannot be resolved when provisioned from a file (use ${{datasource}})")

        walk(d, "")
        if "datasource" not in var_names:
            problem(f"dashboards/{f}: no `datasource` template variable")
    finish(f"dashboards provisionable ({len(files)} file(s))")


# ---------------------------------------------------------------------------------------------
# The exporter's configuration (CONTRACT "Configuration"): known keys only, and consistent with
# the manifests that run it.

DURATION = re.compile(r"^\s*(\d+\s*(ns|us|ms|s|m|h|d|w|sec|min|hour|hours|days|secs|mins)\s*)+$")
POLLING = {"interval": "dur", "max_interval": "dur", "timeout": "dur", "requests_per_second": "num",
           "max_concurrency": "int", "max_task_age": "dur", "retention": "dur"}
CONFIG_KEYS = {
    "server": {"listen_address": "str", "api_token_env": "env"},
    "polling": POLLING,
    "state": {"path": "str"},
    "metrics": {"max_models_per_provider": "int", "latency_buckets": "list"},
    "providers": "providers",
}
PROVIDER_KEYS = {
    "name": "str", "type": "str", "base_url": "str", "token_env": "env", "token_file": "str",
    "tasks": "list", "task_files": "list", "polling": POLLING,
    "webhook": {"enabled": "bool", "token_env": "env"},
    "history": {"enabled": "bool", "interval": "dur", "max_pages": "int", "kinds": "list"},
    "balance": {"enabled": "bool", "interval": "dur"},
    "failure_reasons": "list",
}


def check_config(cfg, where, state_mount=None, env_available=None):
    envs = []

    def check(node, spec, at):
        if isinstance(spec, dict):
            if not isinstance(node, dict):
                problem(f"{where}: {at} must be a mapping")
                return
            for k, v in node.items():
                if k not in spec:
                    problem(f"{where}: unknown key {at}.{k}".replace(": .", ": "))
                else:
                    check(v, spec[k], f"{at}.{k}")
        elif spec == "dur" and not (isinstance(node, str) and DURATION.match(node)):
            problem(f"{where}: {at} = {node!r} is not a duration like 15s, 5m, 6h")
        elif spec == "int" and not (isinstance(node, int) and not isinstance(node, bool)):
            problem(f"{where}: {at} must be an integer")
        elif spec == "num" and not (isinstance(node, (int, float)) and not isinstance(node, bool)):
            problem(f"{where}: {at} must be a number")
        elif spec == "bool" and not isinstance(node, bool):
            problem(f"{where}: {at} must be true or false")
        elif spec == "list" and not isinstance(node, list):
            problem(f"{where}: {at} must be a list")
        elif spec in ("str", "env") and not isinstance(node, str):
            problem(f"{where}: {at} must be a string")
        elif spec == "env":
            envs.append((at, node))
        elif spec == "providers":
            if not isinstance(node, list) or not node:
                problem(f"{where}: providers must be a non-empty list")
                return
            names = [p.get("name") for p in node if isinstance(p, dict)]
            if len(set(names)) != len(names):
                problem(f"{where}: provider names are not unique: {names}")
            for i, p in enumerate(node):
                check(p, PROVIDER_KEYS, f"providers[{i}]")
                if isinstance(p, dict):
                    if p.get("type") not in ("maxapi", "apimall"):
                        problem(f"{where}: providers[{i}].type must be maxapi or apimall")
                    if ("token_env" in p) == ("token_file" in p):
                        problem(f"{where}: providers[{i}] needs exactly one of token_env, token_file")

    check(cfg, CONFIG_KEYS, "")
    state = (cfg.get("state") or {}).get("path")
    if state_mount and not (isinstance(state, str) and state.startswith(state_mount.rstrip("/") + "/")):
        problem(f"{where}: state.path {state!r} is not on the state volume {state_mount}")
    if env_available is not None:
        for at, name in envs:
            if name not in env_available:
                problem(f"{where}: {at.lstrip('.')} names {name}, which the Secret does not provide")
    return [name for _, name in envs]


def cmd_configs(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    secret = yaml.safe_load(read("deploy/kubernetes/secret.example.yaml"))
    secret_keys = set(secret.get("stringData", {}))
    sources = {
        "kubernetes": yaml.safe_load(read("deploy/kubernetes/common/config.yaml")),
        "helm-values": yaml.safe_load(read("charts/genai-task-exporter/values.yaml"))["config"],
    }
    for name, cfg in sources.items():
        check_config(cfg, name, STATE_DIR, secret_keys)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    for k, v in secret.get("stringData", {}).items():
        if v != "REPLACE_ME":
            problem(f"secret.example.yaml: {k} must be the placeholder REPLACE_ME")
    finish("example configurations use documented keys only")


# ---------------------------------------------------------------------------------------------
# Manifests: schema validation plus the policy the deployment promises.

RELABEL = {
    "type": "object",
    "properties": {k: {} for k in ("sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action")},
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}}
DURATION_SCHEMA = {"type": "string", "pattern": r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$"}
# Subsets of the Prometheus Operator CRDs (monitoring.coreos.com/v1) covering what we use, strict.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "sampleLimit": {"type": "integer"},
                    "endpoints": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]}, "interval": DURATION_SCHEMA,
                                "scrapeTimeout": DURATION_SCHEMA, "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"}, "params": {"type": "object"},
                                "relabelings": {"type": "array", "items": RELABEL},
                                "metricRelabelings": {"type": "array", "items": RELABEL},
                                "tlsConfig": {"type": "object"}, "basicAuth": {"type": "object"},
                                "authorization": {"type": "object"}, "bearerTokenSecret": {"type": "object"},
                                "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
                                "filterRunning": {"type": "boolean"},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1}, "interval": DURATION_SCHEMA,
                                "query_offset": DURATION_SCHEMA, "limit": {"type": "integer"},
                                "labels": {"type": "object"}, "partial_response_strategy": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "properties": {
                                            "alert": {"type": "string"}, "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]}, "for": DURATION_SCHEMA,
                                            "keep_firing_for": DURATION_SCHEMA,
                                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def validate_schema(doc, where):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        try:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        except jsonschema.ValidationError as e:
            loc = ".".join(str(p) for p in e.absolute_path)
            problem(f"{where}: {loc}: {e.message}")
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            loc = ".".join(str(p) for p in e.path)
            problem(f"{where}: Kubernetes {version}: {loc}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problem(f"{where}: no schema for {key} in Kubernetes {version}")


def check_workload(w, where, by_kind, external_secret, sharded):
    spec = w["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problem(f"{where}: pod securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser") != UID or psc.get("runAsGroup") != UID or psc.get("fsGroup") != UID:
        problem(f"{where}: pod must run as {UID}:{UID} with fsGroup {UID} (the image's user, owner of the state volume)")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(f"{where}: pod seccompProfile must be RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problem(f"{where}: automountServiceAccountToken must be false")
    containers = pod.get("containers", [])
    if len(containers) != 1:
        problem(f"{where}: exactly one container expected")
        return
    c = containers[0]
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        problem(f"{where}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problem(f"{where}: allowPrivilegeEscalation must be false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(f"{where}: capabilities must drop ALL")
    if f"--config.file={CONFIG_FILE}" not in c.get("args", []):
        problem(f"{where}: args must contain --config.file={CONFIG_FILE}")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    if ports.get("http-metrics") != 9850:
        problem(f"{where}: container port http-metrics must be 9850 (ports: {ports})")
    for probe, want in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != want or get.get("port") != "http-metrics":
            problem(f"{where}: {probe} must GET {want} on port http-metrics")
    res = c.get("resources", {})
    if not res.get("requests", {}).get("cpu") or not res.get("requests", {}).get("memory") or not res.get("limits", {}).get("memory"):
        problem(f"{where}: cpu and memory requests and a memory limit expected")

    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    cfg_vol = volumes.get(mounts.get(CONFIG_DIR), {})
    cm_name = cfg_vol.get("configMap", {}).get("name")
    if cm_name not in by_kind.get("ConfigMap", {}):
        problem(f"{where}: {CONFIG_DIR} must be a ConfigMap of this set (got {cm_name!r})")
    state_vol = mounts.get(STATE_DIR)
    if state_vol is None:
        problem(f"{where}: nothing mounted at {STATE_DIR}")
    elif state_vol not in claims:
        vol = volumes.get(state_vol, {})
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in by_kind.get("PersistentVolumeClaim", {}):
            problem(f"{where}: state claim {claim!r} is not part of this set")
        if claim is None and "emptyDir" not in vol:
            problem(f"{where}: state volume must be a claim or an emptyDir")
    if "/tmp" not in mounts:
        problem(f"{where}: /tmp must be a writable volume (the root filesystem is read-only)")

    secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    for s in secrets:
        if s not in by_kind.get("Secret", {}) and s != external_secret:
            problem(f"{where}: Secret {s!r} is neither part of this set nor the expected external one")
    if external_secret and external_secret not in secrets:
        problem(f"{where}: envFrom must use Secret {external_secret!r}")

    env = {e["name"]: e for e in c.get("env", [])}
    if sharded:
        if w["kind"] != "StatefulSet":
            problem(f"{where}: sharding needs a StatefulSet")
        idx = env.get("GENAI_EXPORTER_SHARD_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if idx != "metadata.labels['apps.kubernetes.io/pod-index']":
            problem(f"{where}: GENAI_EXPORTER_SHARD_INDEX must come from the pod-index label (got {idx!r})")
        if env.get("GENAI_EXPORTER_SHARD_COUNT", {}).get("value") != str(spec.get("replicas")):
            problem(f"{where}: GENAI_EXPORTER_SHARD_COUNT must equal replicas ({spec.get('replicas')})")
        svc = by_kind.get("Service", {}).get(spec.get("serviceName"))
        if svc is None or svc["spec"].get("clusterIP") != "None":
            problem(f"{where}: serviceName must be a headless Service of this set")
        if spec.get("podManagementPolicy") != "Parallel":
            problem(f"{where}: shards should start in parallel (podManagementPolicy: Parallel)")
    else:
        if spec.get("replicas", 1) != 1:
            problem(f"{where}: an unsharded exporter runs exactly one replica per workload")
        if "GENAI_EXPORTER_SHARD_INDEX" in env or "GENAI_EXPORTER_SHARD_COUNT" in env:
            problem(f"{where}: shard variables set on an unsharded exporter")
        if w["kind"] == "Deployment" and spec.get("strategy", {}).get("type") != "Recreate":
            problem(f"{where}: a Deployment with a ReadWriteOnce state volume needs strategy Recreate")

    # The config the pod loads: documented keys, state on the state volume, token variables given.
    if cm_name in by_kind.get("ConfigMap", {}):
        cfg = yaml.safe_load(by_kind["ConfigMap"][cm_name]["data"]["config.yaml"])
        avail = None
        for s in secrets:
            if s in by_kind.get("Secret", {}):
                sec = by_kind["Secret"][s]
                avail = set(sec.get("stringData", {})) | set(sec.get("data", {}))
        check_config(cfg, f"{where} config", STATE_DIR, avail)
    return pod_labels


def cmd_manifests(name, file, external_secret, sharded, selftest=False):
    with open(file, encoding="utf-8") as f:
        docs = load_all(f.read())
    if selftest:
        return selftest_manifests(name, docs, external_secret, sharded)
    check_manifests(name, docs, external_secret, sharded)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    finish(f"{name}: {len(docs)} manifests valid for Kubernetes {', '.join(K8S_VERSIONS)} ({', '.join(kinds)})")


def selftest_manifests(name, docs, external_secret, sharded):
    """The checks must reject broken variants of a valid set (guards against checks that pass vacuously)."""
    def workload(ds):
        return next(d for d in ds if d["kind"] in ("Deployment", "StatefulSet"))

    def container(ds):
        return workload(ds)["spec"]["template"]["spec"]["containers"][0]

    def service(ds):
        return next(d for d in ds if d["kind"] == "Service")

    def configmap(ds):
        return next(d for d in ds if d["kind"] == "ConfigMap")

    def set_config(ds, edit):
        cm = configmap(ds)
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        edit(cfg)
        cm["data"]["config.yaml"] = yaml.safe_dump(cfg)

    mutations = {
        "unknown container field": lambda ds: container(ds).update(bogus=1),
        "writable root filesystem": lambda ds: container(ds)["securityContext"].update(readOnlyRootFilesystem=False),
        "capabilities kept": lambda ds: container(ds)["securityContext"].pop("capabilities"),
        "root user": lambda ds: workload(ds)["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
        "wrong liveness path": lambda ds: container(ds)["livenessProbe"]["httpGet"].update(path="/healthz"),
        "wrong port name": lambda ds: container(ds)["ports"][0].update(name="metrics"),
        "service selects nothing": lambda ds: service(ds)["spec"]["selector"].update({"app.kubernetes.io/name": "other"}),
        "bad port type": lambda ds: service(ds)["spec"]["ports"][0].update(port="9850"),
        "unknown config key": lambda ds: set_config(ds, lambda c: c.update(bogus=1)),
        "state off the volume": lambda ds: set_config(ds, lambda c: c["state"].update(path="data/state")),
        "bad duration": lambda ds: set_config(ds, lambda c: c["polling"].update(interval="15 seconds!")),
    }
    if sharded:
        mutations["shard count != replicas"] = lambda ds: workload(ds)["spec"].update(replicas=7)
    if any(d["kind"] == "ServiceMonitor" for d in docs):
        mutations["ServiceMonitor unknown field"] = lambda ds: next(d for d in ds if d["kind"] == "ServiceMonitor")["spec"]["endpoints"][0].update(bogus=1)
    if any(d["kind"] == "PrometheusRule" for d in docs):
        mutations["rule without expr"] = lambda ds: next(d for d in ds if d["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"][0].pop("expr")
    missed = []
    for what, mutate in mutations.items():
        ds = json.loads(json.dumps(docs))
        mutate(ds)
        problems.clear()
        check_manifests(name, ds, external_secret, sharded)
        if not problems:
            missed.append(what)
    problems.clear()
    for what in missed:
        problem(f"a broken variant passed the checks: {what}")
    finish(f"{name}: checks reject {len(mutations) - len(missed)}/{len(mutations)} broken variants")


def check_manifests(name, docs, external_secret, sharded):
    by_kind = {}
    for d in docs:
        where = f"{name}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        validate_schema(d, where)
        by_kind.setdefault(d.get("kind"), {})[d["metadata"]["name"]] = d

    workloads = [w for k in ("Deployment", "StatefulSet") for w in by_kind.get(k, {}).values()]
    if not workloads:
        problem(f"{name}: no Deployment or StatefulSet")
    pod_label_sets = [check_workload(w, f"{name}: {w['kind']}/{w['metadata']['name']}", by_kind, external_secret, sharded) for w in workloads]

    services = list(by_kind.get("Service", {}).values())
    if len(services) != 1:
        problem(f"{name}: exactly one Service expected")
    for svc in services:
        sel = svc["spec"].get("selector", {})
        ports = {p.get("name"): p for p in svc["spec"].get("ports", [])}
        if ports.get("http-metrics", {}).get("port") != 9850 or ports.get("http-metrics", {}).get("targetPort") != "http-metrics":
            problem(f"{name}: Service port http-metrics must be 9850 -> http-metrics")
        for labels in pod_label_sets:
            if labels is not None and not all(labels.get(k) == v for k, v in sel.items()):
                problem(f"{name}: Service selector {sel} does not select the pods {labels}")
    for sm in by_kind.get("ServiceMonitor", {}).values():
        want = sm["spec"]["selector"].get("matchLabels", {})
        if not any(all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items()) for s in services):
            problem(f"{name}: ServiceMonitor selector {want} matches no Service")
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") != "http-metrics" or ep.get("path", "/metrics") != "/metrics":
                problem(f"{name}: ServiceMonitor must scrape port http-metrics, path /metrics")
    chart_groups = yaml.safe_load(read(CHART_RULES)).get("groups")
    for pr in by_kind.get("PrometheusRule", {}).values():
        if pr["spec"].get("groups") != chart_groups:
            problem(f"{name}: PrometheusRule groups differ from {CHART_RULES}")


def main(argv):
    if not argv:
        sys.exit(__doc__)
    cmd, args = argv[0], argv[1:]
    if cmd == "sync-rules":
        cmd_sync_rules()
    elif cmd == "rules":
        cmd_rules(args[0])
    elif cmd == "dockerfile":
        cmd_dockerfile()
    elif cmd == "compose":
        cmd_compose()
    elif cmd == "dashboards":
        cmd_dashboards()
    elif cmd == "configs":
        cmd_configs(args[0])
    elif cmd == "manifests":
        external, sharded, selftest = None, False, False
        rest = []
        i = 0
        while i < len(args):
            if args[i] == "--external-secret":
                external = args[i + 1]
                i += 2
                continue
            if args[i] == "--sharded":
                sharded = True
            elif args[i] == "--selftest":
                selftest = True
            elif args[i] == "--values":
                # Derive the expectations from a chart values file (over the chart's defaults).
                values = yaml.safe_load(read("charts/genai-task-exporter/values.yaml"))
                with open(args[i + 1], encoding="utf-8") as f:
                    override = yaml.safe_load(f) or {}
                sharded = int(override.get("sharding", values["sharding"])["count"]) > 1
                external = (override.get("secret") or {}).get("existingSecret") or values["secret"]["existingSecret"] or None
                i += 1
            else:
                rest.append(args[i])
            i += 1
        cmd_manifests(rest[0], rest[1], external, sharded, selftest)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
