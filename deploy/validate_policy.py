#!/usr/bin/env python3
"""Checks and test-environment preparation for deploy/validate.sh (not meant to be run alone).

Each subcommand prints one line per check ("ok" / "FAIL") and exits 1 if any check failed.
The prepare-* subcommands lay out, under a scratch ROOT folder, the files a deployment would
see (volume mounts, compose secrets, systemd credentials) from a throwaway test PKI, and write
the hubgate environment of that deployment, with its absolute paths moved under ROOT, to an
env file (one NAME=VALUE a line) that validate.sh hands to `hubgate check` / `hubgate run`.

Needs PyYAML (installed with kubernetes-validate) and Python >= 3.11 (tomllib).
"""

import json
import os
import re
import shutil
import socket
import sys
import tomllib
from pathlib import Path

import yaml

FAILURES: list[str] = []
PASSED: list[str] = []
VERBOSE = os.environ.get("HUBGATE_VALIDATE_VERBOSE") == "1"
DRAIN_SECONDS = 10  # hubgate's default server.drain_timeout


def check(ok: bool, what: str) -> bool:
    """Records one check; prints failures always, passes with HUBGATE_VALIDATE_VERBOSE=1."""
    if ok:
        PASSED.append(what)
        if VERBOSE:
            print(f"  ok   {what}")
    else:
        FAILURES.append(what)
        print(f"  FAIL {what}")
    return ok


def finish() -> None:
    print(f"  {len(PASSED)} checks passed, {len(FAILURES)} failed")
    if FAILURES:
        sys.exit(1)


def known_env(repo: Path) -> set[str]:
    """HUBGATE_* names hubgate reads: the overlay's table (`name: "HUBGATE_…"` entries in
    src/config/env.rs, from which ENV_VARS derives; src/config.rs before the module was split)
    plus clap `env = "…"` arguments anywhere in src/ (main.rs, spool_cli.rs)."""
    names: set[str] = set()
    table_files = [p for p in (repo / "src/config/env.rs", repo / "src/config.rs") if p.is_file()]
    for path in table_files:
        text = path.read_text()
        names |= set(re.findall(r'name:\s*"(HUBGATE_[A-Z0-9_]+)"', text))
        if "pub const ENV_VARS" in text and "ENV_VARS_ARRAY" not in text:  # the old literal table
            start = text.index("pub const ENV_VARS")
            names |= set(re.findall(r'"(HUBGATE_[A-Z0-9_]+)"', text[start : text.index("];", start)]))
    for path in (repo / "src").rglob("*.rs"):
        names |= set(re.findall(r'env\s*=\s*"(HUBGATE_[A-Z0-9_]+)"', path.read_text()))
    if len(names) < 10:
        raise SystemExit(f"could not read hubgate's environment variables from {repo}/src")
    return names | {"RUST_LOG"}


# The PostgreSQL spool backend's variables (design fixed, src/ may not read them yet): accepted
# in the shared-PostgreSQL files, and reported as pending while src/ does not list them.
PG_ENV = {"HUBGATE_SPOOL_BACKEND", "HUBGATE_SPOOL_URL", "HUBGATE_SPOOL_URL_FILE"}


def known_env_pg(repo: Path) -> set[str]:
    known = known_env(repo)
    pending = sorted(PG_ENV - known)
    if pending:
        print(f"  ..   not yet read by src/ (PostgreSQL backend pending): {' '.join(pending)}")
    return known | PG_ENV


def check_env_names(env: dict[str, str], known: set[str], where: str) -> None:
    unknown = sorted(n for n in env if n not in known)
    check(not unknown, f"{where}: every variable is one hubgate reads {unknown or ''}")


def duration_seconds(text) -> float:
    """'20s', '1m30s', '500ms', 20 -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    total, units = 0.0, {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "us": 1e-6, "ns": 1e-9}
    for number, unit in re.findall(r"([0-9.]+)\s*(ms|us|ns|s|m|h)", str(text)):
        total += float(number) * units[unit]
    return total


def under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def link(target: Path, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source.resolve())


# The variables whose values are file paths (HUBGATE_CLIENT_ROOTS: a comma-separated list).
PATH_VARS = {
    "HUBGATE_CONFIG",
    "HUBGATE_CERT",
    "HUBGATE_KEY",
    "HUBGATE_CLIENT_ROOTS",
    "HUBGATE_VERIFY_TOKEN_FILE",
    "HUBGATE_APP_SECRET_FILE",
    "HUBGATE_SPOOL_PATH",
    "HUBGATE_SPOOL_URL_FILE",
}


def write_env(env: dict[str, str], root: Path, out: Path, specifiers=None) -> None:
    """Moves file paths under root (after specifier substitution) and writes NAME=VALUE."""
    lines = []
    for name, value in env.items():
        value = str(value)
        for spec, replacement in (specifiers or {}).items():
            value = value.replace(spec, replacement)
        if name in PATH_VARS:
            moved = []
            for p in value.split(","):
                p = p.strip()
                moved.append(p if not p.startswith("/") or p.startswith(str(root)) else str(under(root, p)))
            value = ",".join(moved)
        if "\n" in value:
            raise SystemExit(f"{name}: a value with a newline cannot go into an env file")
        lines.append(f"{name}={value}")
    out.write_text("".join(line + "\n" for line in lines))


# Which file of local-pki.sh's test PKI stands in for a file a deployment names.
PKI_FILES = {
    "tls.crt": "tls/server-chain.pem",
    "server-chain.pem": "tls/server-chain.pem",
    "tls.key": "tls/server.key",
    "server.key": "tls/server.key",
    "verify-token": "secrets/verify_token",
    "verify_token": "secrets/verify_token",
    "app-secret": "secrets/app_secret",
    "app_secret": "secrets/app_secret",
    "meta-outbound-api-ca-2025-12.pem": "meta-ca/meta-outbound-api-ca-2025-12.pem",
    # The database's CA (shared-PostgreSQL topology): the test server CA stands in.
    "db-ca.pem": "tls/ca.pem",
    "postgres_password": "secrets/postgres_password",
    "spool_url": "secrets/spool_url",
}


def pki_file(pki: Path, name: str, repo: Path | None = None) -> Path:
    if name in PKI_FILES:
        return pki / PKI_FILES[name]
    if repo is not None and (repo / "certs" / name).is_file():
        return repo / "certs" / name
    raise SystemExit(f"no test file stands in for `{name}`: extend PKI_FILES in {__file__}")


# ----------------------------------------------------------------------------------------------
# Kubernetes
# ----------------------------------------------------------------------------------------------


def load_k8s(kdir: Path):
    """The kustomization's resources: files, and folders with their own kustomization.yaml
    (included the way kustomize does, recursively). Kustomize itself is not run."""
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    docs = []
    for res in kust.get("resources", []):
        path = kdir / res
        if path.is_dir():
            if check((path / "kustomization.yaml").is_file(), f"kustomization resource {res}/ has a kustomization.yaml"):
                _, sub = load_k8s(path)
                docs += [(f"{res}/{r}", d) for r, d in sub]
            continue
        if not check(path.is_file(), f"kustomization resource {res} exists"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((res, doc))
    listed = {r for r in kust.get("resources", [])}
    on_disk = {p.name for p in kdir.glob("*.yaml")} - {"kustomization.yaml"}
    check(on_disk <= listed, f"every manifest is listed in {kdir.name}/kustomization.yaml {sorted(on_disk - listed) or ''}")
    return kust, docs


def find(docs, kind, name=None):
    for _, d in docs:
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    return None


def container_hardened(c: dict, pod_sc: dict, label: str) -> None:
    sc = c.get("securityContext", {})
    get = lambda k: sc.get(k, pod_sc.get(k))  # noqa: E731
    check(get("runAsNonRoot") is True, f"{label}: runAsNonRoot")
    uid = get("runAsUser")
    check(uid is None or uid != 0, f"{label}: runAsUser is not 0")
    check(sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation false")
    check(sc.get("privileged", False) is False, f"{label}: not privileged")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities drop ALL")
    check(not sc.get("capabilities", {}).get("add"), f"{label}: no capability added")
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
    check(seccomp.get("type") == "RuntimeDefault", f"{label}: seccomp RuntimeDefault")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            check(r in res.get(kind, {}), f"{label}: resources.{kind}.{r} set")


def cmd_k8s(kdir: Path, repo: Path) -> None:
    known = known_env(repo)
    kust, docs = load_k8s(kdir)
    dep = find(docs, "Deployment")
    if not check(dep is not None, "a Deployment exists"):
        return finish()
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    check(dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "Deployment selector matches the pod labels")
    pod_sc = pod.get("securityContext", {})
    containers = {c["name"]: c for c in pod["containers"]}
    check(set(containers) == {"hubgate", "app"}, "the pod has the hubgate and app containers")
    hg, app = containers.get("hubgate"), containers.get("app")
    if hg is None or app is None:
        return finish()

    # Images are set by kustomization.yaml.
    images = {i["name"] for i in kust.get("images", [])}
    for c in pod["containers"]:
        check(c["image"] in images, f"{c['name']}: image `{c['image']}` is set by kustomization.yaml images:")

    env = {e["name"]: e.get("value") for e in hg.get("env", [])}
    check(all("value" in e for e in hg["env"]), "hubgate: env values are literal (secrets come as files)")
    check_env_names(env, known, "hubgate env")
    check(env.get("HUBGATE_UPSTREAM") == "http://127.0.0.1:3000/webhook", "hubgate: HUBGATE_UPSTREAM=http://127.0.0.1:3000/webhook")
    check("HUBGATE_VERIFY_TOKEN" not in env and "HUBGATE_APP_SECRET" not in env, "hubgate: no secret value in the environment")
    check(bool(env.get("HUBGATE_VERIFY_TOKEN_FILE")) and bool(env.get("HUBGATE_APP_SECRET_FILE")), "hubgate: verify token and app secret from files (*_FILE)")
    check(env.get("HUBGATE_CLIENT_AUTH") == "require", "hubgate: client auth required")
    ports = {p["name"]: p["containerPort"] for p in hg.get("ports", [])}
    check(ports.get("https") == 8443 and env.get("HUBGATE_LISTEN", "").endswith(":8443"), "hubgate: listens on 8443, port named https")
    admin = env.get("HUBGATE_ADMIN_LISTEN", "")
    check(ports.get("admin") == 9901 and admin == "0.0.0.0:9901", "hubgate: admin on 0.0.0.0:9901 (kubelet probes the pod IP), port named admin")

    rp, lp = hg.get("readinessProbe", {}), hg.get("livenessProbe", {})
    check(rp.get("httpGet", {}).get("path") == "/readyz" and rp["httpGet"].get("port") in ("admin", 9901), "hubgate: readinessProbe GET /readyz on the admin port")
    check(lp.get("httpGet", {}).get("path") == "/healthz" and lp["httpGet"].get("port") in ("admin", 9901), "hubgate: livenessProbe GET /healthz on the admin port")
    app_ports = [p.get("containerPort") for p in app.get("ports", [])]
    check(not app_ports, "app: exposes no container port (reachable through hubgate only)")

    container_hardened(hg, pod_sc, "hubgate")
    container_hardened(app, pod_sc, "app")
    check(pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) != 0, "pod: runAsNonRoot, non-zero runAsUser")
    check(pod_sc.get("runAsUser") == 10001, "pod: runAsUser matches the image's UID 10001")
    check(pod.get("automountServiceAccountToken") is False, "pod: no service account token mounted")

    def pre_stop_seconds(c):
        ps = c.get("lifecycle", {}).get("preStop", {})
        if "sleep" in ps:
            return ps["sleep"]["seconds"]
        cmd = ps.get("exec", {}).get("command", [])
        return int(cmd[1]) if cmd[:1] == ["sleep"] else 0

    grace = pod.get("terminationGracePeriodSeconds", 30)
    hg_stop, app_stop = pre_stop_seconds(hg), pre_stop_seconds(app)
    check(grace > DRAIN_SECONDS + hg_stop, f"pod: terminationGracePeriodSeconds {grace} > hubgate preStop {hg_stop} + drain {DRAIN_SECONDS}")
    check(app_stop >= hg_stop + DRAIN_SECONDS, f"app: preStop {app_stop}s outlasts hubgate's preStop + drain ({hg_stop + DRAIN_SECONDS}s)")
    check(grace > app_stop, f"pod: terminationGracePeriodSeconds {grace} > app preStop {app_stop}")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in hg.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        check(m.get("readOnly") is True, f"hubgate: volume {m['name']} mounted read-only")
        if "secret" in v:
            check(find(docs, "Secret", v["secret"]["secretName"]) is not None, f"volume {m['name']}: Secret {v['secret']['secretName']} is defined")
        if "configMap" in v:
            check(find(docs, "ConfigMap", v["configMap"]["name"]) is not None, f"volume {m['name']}: ConfigMap {v['configMap']['name']} is defined")

    svc = find(docs, "Service")
    if check(svc is not None, "a Service exists"):
        check(svc["spec"]["selector"].items() <= pod_labels.items(), "Service selector matches the pod")
        sp = svc["spec"]["ports"]
        target = {p["port"]: p.get("targetPort") for p in sp}
        resolved = ports.get(target.get(443), target.get(443))
        check(len(sp) == 1 and resolved == 8443, "Service exposes only 443 -> hubgate 8443")
    pdb = find(docs, "PodDisruptionBudget")
    if pdb is not None:
        check(pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "PodDisruptionBudget selector matches the pod")

    for _, d in docs:
        if d["kind"] in ("Secret", "ConfigMap"):
            values = {**d.get("data", {}), **d.get("stringData", {})}
            if d["kind"] == "Secret":
                check("data" not in d, f"{d['kind']} {d['metadata']['name']}: placeholders in stringData, no base64 data")
            check(all(str(v).strip() == "REPLACE_ME" for v in values.values()), f"{d['kind']} {d['metadata']['name']}: every value is the placeholder REPLACE_ME")
    finish()


def cmd_prepare_k8s(kdir: Path, pki: Path, root: Path, out: Path, repo: Path) -> None:
    """Projects the hubgate container's volumes like the kubelet would, from the test PKI."""
    _, docs = load_k8s(kdir)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    hg = next(c for c in pod["containers"] if c["name"] == "hubgate")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in hg.get("volumeMounts", []):
        v = volumes[m["name"]]
        if "secret" in v:
            src = find(docs, "Secret", v["secret"]["secretName"])
        elif "configMap" in v:
            src = find(docs, "ConfigMap", v["configMap"]["name"])
        else:
            continue
        for key in {**src.get("data", {}), **src.get("stringData", {})}:
            link(under(root, m["mountPath"]) / key, pki_file(pki, key, repo))
    env = {e["name"]: e["value"] for e in hg["env"]}
    write_env(env, root, out)
    print(f"  ok   kubernetes: hubgate's volumes projected under {root}")
    finish()


# ----------------------------------------------------------------------------------------------
# Compose (reads the output of `docker-compose config --format json`)
# ----------------------------------------------------------------------------------------------


def compose_env(svc) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def cmd_compose(cfg_path: Path, dockerfile: Path, repo: Path) -> None:
    known = known_env(repo)
    cfg = json.loads(cfg_path.read_text())
    services = cfg["services"]
    hg = services.get("hubgate")
    if not check(hg is not None, "compose: a hubgate service"):
        return finish()
    env = compose_env(hg)
    check_env_names(env, known, "compose hubgate environment")
    check(hg.get("read_only") is True, "compose hubgate: read_only: true")
    check(re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", str(hg.get("user", ""))) is not None, "compose hubgate: numeric non-root user")
    check(hg.get("cap_drop") == ["ALL"], "compose hubgate: cap_drop ALL")
    check(any("no-new-privileges" in s for s in hg.get("security_opt", [])), "compose hubgate: no-new-privileges")
    check(bool(hg.get("healthcheck", {}).get("test")), "compose hubgate: healthcheck")
    grace = duration_seconds(hg.get("stop_grace_period", "10s"))
    check(grace > DRAIN_SECONDS, f"compose hubgate: stop_grace_period {grace:g}s > drain {DRAIN_SECONDS}s")
    check("HUBGATE_VERIFY_TOKEN" not in env and "HUBGATE_APP_SECRET" not in env, "compose hubgate: no secret value in the environment")
    secret_targets = {f"/run/secrets/{s['source']}" if not str(s.get("target", "")).startswith("/") else s["target"] for s in hg.get("secrets", [])}
    for var in ("HUBGATE_VERIFY_TOKEN_FILE", "HUBGATE_APP_SECRET_FILE"):
        check(env.get(var) in secret_targets, f"compose hubgate: {var} is a mounted compose secret")
    for v in hg.get("volumes", []):
        check(v.get("read_only") is True, f"compose hubgate: {v['target']} mounted read-only")
    upstream_host = re.match(r"https?://([^:/]+)", env.get("HUBGATE_UPSTREAM", ""))
    check(upstream_host is not None and upstream_host.group(1) in services, "compose hubgate: HUBGATE_UPSTREAM names a compose service")
    published = {(p.get("host_ip", ""), int(p["target"])) for p in hg.get("ports", [])}
    check(("", 8443) in published or ("0.0.0.0", 8443) in published, "compose hubgate: 8443 published")
    check(all(ip == "127.0.0.1" for ip, t in published if t == 9901), "compose hubgate: admin 9901 published on loopback only")
    be = services.get("backend")
    if check(be is not None, "compose: a sample backend service"):
        check(be.get("read_only") is True and be.get("cap_drop") == ["ALL"], "compose backend: read_only, cap_drop ALL")
        check(not be.get("ports"), "compose backend: not published")
        check(str(be.get("user", "0")).split(":")[0] not in ("", "0", "root"), "compose backend: non-root user")
        check(bool(be.get("healthcheck", {}).get("test")), "compose backend: healthcheck")
    # The image's HEALTHCHECK and compose's are the same command.
    check(dockerfile_healthcheck(dockerfile) == hg["healthcheck"]["test"], "compose hubgate healthcheck == the Dockerfile's HEALTHCHECK")
    finish()


def cmd_prepare_compose(cfg_path: Path, root: Path, out: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    hg = cfg["services"]["hubgate"]
    for v in hg.get("volumes", []):
        if v["type"] == "bind":
            check(Path(v["source"]).exists(), f"compose: bind source {v['source']} exists")
            link(under(root, v["target"]), Path(v["source"]))
    for s in hg.get("secrets", []):
        target = s.get("target") or s["source"]
        target = target if target.startswith("/") else f"/run/secrets/{target}"
        src = Path(cfg["secrets"][s["source"]]["file"])
        check(src.is_file(), f"compose: secret file {src} exists")
        link(under(root, target), src)
    write_env(compose_env(hg), root, out)
    print(f"  ok   compose: hubgate's mounts and secrets laid out under {root}")
    finish()


def cmd_compose_get(cfg_path: Path, what: str) -> None:
    """Prints a piece of the compose config for validate.sh: backend-script, healthcheck-command."""
    cfg = json.loads(cfg_path.read_text())
    if what == "backend-script":
        cmd = cfg["services"]["backend"]["command"]
        print(cmd[cmd.index("-c") + 1])
    elif what == "gates":
        print(" ".join(sorted(compose_gates(cfg))))
    elif what == "healthcheck-command":
        test = cfg["services"]["hubgate"]["healthcheck"]["test"]
        assert test[0] == "CMD" and all(" " not in a for a in test), test
        print(" ".join(test[1:]))
    else:
        raise SystemExit(f"unknown: {what}")


# ----------------------------------------------------------------------------------------------
# Dockerfile and its ignore file
# ----------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_healthcheck(path: Path):
    for word, rest in dockerfile_instructions(path):
        if word == "HEALTHCHECK":
            return ["CMD", *json.loads(rest[rest.index("CMD") + 3 :].strip())]
    return None


def cmd_dockerfile(path: Path) -> None:
    ins = dockerfile_instructions(path)
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    sub = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)  # noqa: E731
    froms = [sub(rest).split() for word, rest in ins if word == "FROM"]
    check(len(froms) == 2, "Dockerfile: two stages")
    check(froms[0][0] == "rust:1-bookworm", f"Dockerfile: builder is rust:1-bookworm ({froms[0][0]})")
    check(froms[-1][0] in ("debian:bookworm-slim", "gcr.io/distroless/cc-debian12", "gcr.io/distroless/cc-debian12:nonroot"), f"Dockerfile: runtime is {froms[-1][0]}")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    check("cargo build --release --locked" in runs, "Dockerfile: cargo build --release --locked")
    check("ca-certificates" in runs or "distroless" in froms[-1][0], "Dockerfile: runtime has ca-certificates")
    users = [rest for word, rest in ins if word == "USER"]
    check(bool(users) and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]) is not None, f"Dockerfile: numeric non-root USER {users[-1:] or ''}")
    last = {word: rest for word, rest in ins}
    check(json.loads(last.get("ENTRYPOINT", "null")) == ["hubgate"], 'Dockerfile: ENTRYPOINT ["hubgate"]')
    check(json.loads(last.get("CMD", "null")) == ["run"], 'Dockerfile: CMD ["run"]')
    exposed = set(" ".join(rest for word, rest in ins if word == "EXPOSE").split())
    check({"8443", "9901"} <= exposed, "Dockerfile: EXPOSE 8443 9901")
    copies = [rest.split() for word, rest in ins if word == "COPY"]
    check(any(c[-2:] == ["certs/", "/etc/hubgate/certs/"] for c in copies), "Dockerfile: certs/ copied to /etc/hubgate/certs/")
    check(not any(w == "VOLUME" for w, _ in ins), "Dockerfile: no VOLUME (nothing writable is needed)")
    check(dockerfile_healthcheck(path) is not None, "Dockerfile: HEALTHCHECK on the admin listener")
    finish()


def ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regular expression (moby/patternmatcher semantics)."""
    p = os.path.normpath(pattern.strip().lstrip("/"))
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + "$")


def cmd_dockerignore(context: Path, ignore_file: Path, dockerfile: Path) -> None:
    rules, negations = [], []
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pattern = line[1:] if neg else line
        rules.append((neg, ignore_regex(pattern)))
        if neg:
            negations.append(os.path.normpath(pattern.lstrip("/")))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for neg, rx in rules:
            if any(rx.match(p) for p in prefixes):
                result = not neg
        return result

    sent = []
    for dirpath, dirnames, filenames in os.walk(context):
        rel_dir = os.path.relpath(dirpath, context)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in dirnames:
            rel = rel_dir + d
            # Descend into an excluded folder only if a `!` rule could re-include below it.
            if excluded(rel) and not any(n.startswith((rel + "/", "**")) for n in negations):
                continue
            keep.append(d)
        dirnames[:] = keep
        sent += [rel_dir + f for f in filenames if not excluded(rel_dir + f)]
    sent_set = set(sent)
    print(f"  ..   {len(sent)} files would be sent as build context" + (": " + " ".join(sorted(sent)) if VERBOSE else ""))
    for word, rest in dockerfile_instructions(dockerfile):
        if word != "COPY" or "--from=" in rest:
            continue
        for src in [a for a in rest.split() if not a.startswith("--")][:-1]:
            src = src.rstrip("/")
            present = src in sent_set or any(s.startswith(src + "/") for s in sent)
            check(present, f"context keeps COPY source {src}")
    bad = [s for s in sent if s.startswith((".git/", "target/", "deploy/local/")) or s.endswith((".key", ".p12", ".pfx"))]
    check(not bad, f"context sends no .git/, target/, deploy/local/ or key file {bad[:5] or ''}")
    finish()


# ----------------------------------------------------------------------------------------------
# systemd unit and the example config
# ----------------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def unit_env(u) -> dict[str, str]:
    env = {}
    for line in u.get("Service.Environment", []):
        for item in line.split():
            k, _, v = item.strip('"').partition("=")
            env[k] = v
    return env


def cmd_systemd(unit: Path, repo: Path) -> None:
    known = known_env(repo)
    u = parse_unit(unit)
    one = lambda k: (u.get(f"Service.{k}") or [None])[-1]  # noqa: E731
    yes = lambda k: one(k) in ("yes", "true", "1", "on")  # noqa: E731
    check(one("ProtectSystem") == "strict", "unit: ProtectSystem=strict")
    check(one("ProtectHome") in ("yes", "true", "read-only", "tmpfs"), "unit: ProtectHome")
    for k in ("PrivateTmp", "NoNewPrivileges", "MemoryDenyWriteExecute", "LockPersonality", "PrivateDevices", "RestrictNamespaces", "RestrictSUIDSGID", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups"):
        check(yes(k), f"unit: {k}=yes")
    check(yes("DynamicUser") or bool(one("User")), "unit: DynamicUser= or User= (not root)")
    check(one("CapabilityBoundingSet") in ("", "CAP_NET_BIND_SERVICE"), "unit: CapabilityBoundingSet= empty (or only CAP_NET_BIND_SERVICE)")
    check(sorted((one("RestrictAddressFamilies") or "").split()) == ["AF_INET", "AF_INET6", "AF_UNIX"], "unit: RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX")
    check("@system-service" in (u.get("Service.SystemCallFilter") or [""])[0], "unit: SystemCallFilter=@system-service")
    check(any(c.endswith("hubgate check") for c in u.get("Service.ExecStartPre", [])), "unit: ExecStartPre=hubgate check")
    check(any(c.endswith("hubgate run") for c in u.get("Service.ExecStart", [])), "unit: ExecStart=hubgate run")
    check(any(re.search(r"kill -HUP \$MAINPID$", c) for c in u.get("Service.ExecReload", [])), "unit: ExecReload=/bin/kill -HUP $MAINPID")
    check(one("KillSignal") == "SIGTERM", "unit: KillSignal=SIGTERM")
    stop = duration_seconds(one("TimeoutStopSec") or "90s")
    check(stop > DRAIN_SECONDS, f"unit: TimeoutStopSec {stop:g}s > drain {DRAIN_SECONDS}s")
    check(one("Restart") == "on-failure", "unit: Restart=on-failure")
    env = unit_env(u)
    check_env_names(env, known, "unit Environment=")
    creds = dict(c.split(":", 1) for c in u.get("Service.LoadCredential", []))
    for var in ("HUBGATE_VERIFY_TOKEN_FILE", "HUBGATE_APP_SECRET_FILE", "HUBGATE_KEY"):
        value = env.get(var, "")
        m = re.fullmatch(r"%d/(.+)", value)
        check(m is not None and m.group(1) in creds, f"unit: {var}=%d/<credential> names a LoadCredential= ({value})")
    check(not any("$CREDENTIALS_DIRECTORY" in v or "${" in v for v in env.values()), "unit: no $VAR in Environment= (systemd does not expand it there)")
    finish()


def prepare_example_tree(example: Path, pki: Path, root: Path, repo: Path) -> Path:
    """example.toml with /etc/hubgate/ moved under root, and every file it names laid out."""
    text = example.read_text()
    conf = tomllib.loads(text)
    paths = [conf["server"]["cert"], conf["server"]["key"], *conf["client_auth"]["roots"]]
    if "ca" in conf.get("upstream", {}):
        paths.append(conf["upstream"]["ca"])
    for r in conf["route"]:
        for s in [r["verify_token"], *r["app_secrets"]]:
            check(isinstance(s, dict) and "file" in s, f"example route {r['path']}: secrets come from files, not inline")
            if isinstance(s, dict) and "file" in s:
                paths.append(s["file"])
    for p in paths:
        check(p.startswith("/etc/hubgate/"), f"example: {p} is under /etc/hubgate/")
        link(under(root, p), pki_file(pki, Path(p).name, repo))
    for pem in (repo / "certs").glob("*.pem"):  # what the image and the install steps ship
        link(root / "etc/hubgate/certs" / pem.name, pem)
    check(all(r.startswith("/etc/hubgate/certs/") for r in conf["client_auth"]["roots"]), "example: trust anchors under /etc/hubgate/certs/")
    check(conf.get("admin", {}).get("listen", "").startswith("127.0.0.1:"), "example: admin listener on loopback")
    check(conf["client_auth"]["mode"] == "require", "example: client_auth.mode = require")
    out = root / "etc/hubgate/hubgate.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.replace("/etc/hubgate/", f"{root}/etc/hubgate/"))
    return out


def cmd_prepare_example(example: Path, pki: Path, root: Path, repo: Path) -> None:
    out = prepare_example_tree(example, pki, root, repo)
    print(f"  ok   example config laid out as {out}")
    finish()


def cmd_prepare_systemd(unit: Path, example: Path, pki: Path, root: Path, out: Path, repo: Path) -> None:
    """The unit's view: its Environment=, credentials copied from their sources like systemd does."""
    prepare_example_tree(example, pki, root, repo)
    u = parse_unit(unit)
    creds_dir = root / "run/credentials/hubgate.service"
    creds_dir.mkdir(parents=True, exist_ok=True)
    for c in u.get("Service.LoadCredential", []):
        cid, src = c.split(":", 1)
        source = under(root, src)
        check(source.exists(), f"unit: LoadCredential {cid} source {src} exists in the laid-out tree")
        if source.exists():
            shutil.copyfile(source, creds_dir / cid)
    write_env(unit_env(u), root, out, specifiers={"%d": str(creds_dir)})
    print(f"  ok   systemd: credentials copied to {creds_dir}")
    finish()


# ----------------------------------------------------------------------------------------------
# What the service did, under strace, against what the unit allows
# ----------------------------------------------------------------------------------------------


def expand_groups(listing: str) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif current is not None and line.startswith("    ") and not line.strip().startswith("#"):
            current.add(line.strip())
    resolved: dict[str, set[str]] = {}

    def resolve(g: str, seen=()) -> set[str]:
        if g in resolved:
            return resolved[g]
        out = set()
        for item in groups.get(g, set()):
            out |= resolve(item, seen + (g,)) if item.startswith("@") and item not in seen else {item}
        resolved[g] = out
        return out

    for g in groups:
        resolve(g)
    return resolved


def cmd_strace(unit: Path, filter_listing: Path, *logs: Path) -> None:
    u = parse_unit(unit)
    groups = expand_groups(filter_listing.read_text())
    allowed: set[str] = set()
    for line in u.get("Service.SystemCallFilter", []):
        deny = line.startswith("~")
        names = set()
        for item in line.lstrip("~").split():
            names |= groups[item] if item.startswith("@") else {item}
        allowed = (allowed - names) if deny else (allowed | names)
    families = set((u.get("Service.RestrictAddressFamilies") or [""])[-1].split())
    used, sockets, wx, proc, writes = set(), set(), [], set(), set()
    call = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)(.*)$")
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = call.match(line)
            if not m:
                continue
            name, rest = m.groups()
            used.add(name)
            if " resumed>" in line:
                # The second half of a call another thread's line interrupted: its arguments
                # were on the `<unfinished ...>` line, which was read as the call.
                continue
            if name in ("socket", "socketpair"):
                fam = rest.split(",", 1)[0].strip()
                sockets.add(fam)
            if name in ("mmap", "mprotect", "pkey_mprotect") and "PROT_EXEC" in rest and ("PROT_WRITE" in rest or name != "mmap"):
                wx.append(line.strip()[:160])
            if name in ("openat", "open", "statx", "newfstatat"):
                pm = re.search(r'"(/proc/[^"]*)"', rest)
                if pm and not re.match(r"/proc/(self|thread-self|\d+)(/|$)", pm.group(1)):
                    proc.add(pm.group(1))
                wm = re.search(r'"([^"]+)", (O_[A-Z_|]+)', rest)
                if name in ("openat", "open") and wm and re.search(r"O_WRONLY|O_RDWR|O_CREAT", wm.group(2)) and "ENOENT" not in rest:
                    writes.add(wm.group(1))
    used.discard("execve")  # strace's exec of hubgate itself
    print(f"  ..   {len(used)} distinct system calls made")
    check(used <= allowed, f"every system call is allowed by the unit's SystemCallFilter= {sorted(used - allowed) or ''}")
    check(sockets <= families, f"every socket family is in RestrictAddressFamilies= {sorted(sockets - families) or ''}")
    check(not wx, f"no writable+executable or mprotect(PROT_EXEC) mapping (MemoryDenyWriteExecute=) {wx[:2] or ''}")
    # mimalloc (the allocator) reads the overcommit policy once at start; under ProcSubset=pid
    # the file is absent and mimalloc assumes overcommit, which is Linux's default (0) anyway.
    proc.discard("/proc/sys/vm/overcommit_memory")
    check(not proc, f"/proc read only for its own process (ProcSubset=pid) {sorted(proc) or ''}")
    bad_writes = sorted(w for w in writes if not w.startswith(("/dev/null", "/dev/tty")))
    check(not bad_writes, f"no file opened for writing (ProtectSystem=strict, read-only root) {bad_writes or ''}")
    finish()


# ----------------------------------------------------------------------------------------------
# Shared PostgreSQL topology: kubernetes-postgres/ and compose-postgres.yaml
# ----------------------------------------------------------------------------------------------

# On SIGTERM: requests drain for drain_timeout, running deliveries get up to this long.
DELIVERY_STOP_SECONDS = 10
META_TIMEOUT_SECONDS = 5  # Meta gives up on a delivery after 5 s
# [spool] / [dedupe] keys only the PostgreSQL backend has (dropped for the SQLite stand-in).
PG_SPOOL_KEYS = ("backend", "url", "pool_size", "ca", "lease", "accept_timeout")
PG_DEDUPE_KEYS = ("store",)
PG_URL = re.compile(r"postgres(?:ql)?://")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def pg_url_parts(url: str) -> dict:
    """libpq URL -> user, password, host, port, db, sslmode (None when absent)."""
    m = re.fullmatch(r"postgres(?:ql)?://(?:([^:@/]*)(?::([^@/]*))?@)?(\[[^\]]+\]|[^:/?]*)(?::(\d+))?(?:/([^?]*))?(?:\?(.*))?", url.strip())
    if not m:
        return {}
    user, password, host, port, db, query = m.groups()
    params = dict(p.split("=", 1) for p in (query or "").split("&") if "=" in p)
    return {"user": user, "password": password, "host": host, "port": port, "db": db, "sslmode": params.get("sslmode")}


def check_url_placeholder(url: str, label: str, ca_set: bool) -> None:
    """A Secret's URL placeholder: a libpq URL whose password and host are REPLACE_ME, with an
    sslmode that authenticates the (remote) server."""
    u = pg_url_parts(url)
    check(bool(u), f"{label}: a postgres:// URL in libpq form")
    check(u.get("password") == "REPLACE_ME" and u.get("host") == "REPLACE_ME", f"{label}: password and host are the placeholder REPLACE_ME")
    check(u.get("sslmode") in ("require", "verify-ca", "verify-full"), f"{label}: sslmode require/verify-ca/verify-full across the cluster network (got {u.get('sslmode')})")
    if ca_set:
        check(u.get("sslmode") in ("verify-ca", "verify-full"), f"{label}: [spool] ca is set, so sslmode verifies the server (verify-full/verify-ca)")


def pod_env(c: dict) -> dict:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def mount_source(pod: dict, c: dict, path: str, docs):
    """(kind, name, key) of the Secret/ConfigMap file at `path` in container c, or None."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mp):
            v = volumes.get(m["name"], {})
            key = path[len(mp):]
            if "secret" in v:
                return ("Secret", v["secret"]["secretName"], key)
            if "configMap" in v:
                return ("ConfigMap", v["configMap"]["name"], key)
    return None


def doc_values(d: dict) -> dict:
    return {**(d.get("data") or {}), **(d.get("stringData") or {})}


def check_pg_container(pod, c, docs, known, label, conf) -> dict:
    """What the gates and the migration Job share: env, secrets as files, spool settings."""
    env = pod_env(c)
    check(all("value" in e for e in c.get("env", [])), f"{label}: env values are literal (secrets come as files, no valueFrom)")
    check_env_names(env, known, f"{label} env")
    check("HUBGATE_VERIFY_TOKEN" not in env and "HUBGATE_APP_SECRET" not in env, f"{label}: no secret value in the environment")
    check("HUBGATE_SPOOL_URL" not in env, f"{label}: no HUBGATE_SPOOL_URL: the database URL comes as a file (HUBGATE_SPOOL_URL_FILE)")
    check(not any(PG_URL.search(str(v or "")) for v in env.values()), f"{label}: no postgres:// URL in an env value")
    check(env.get("HUBGATE_DELIVERY") == "spool", f"{label}: HUBGATE_DELIVERY=spool")
    backend = env.get("HUBGATE_SPOOL_BACKEND") or conf.get("spool", {}).get("backend")
    check(backend == "postgres", f"{label}: spool backend postgres (HUBGATE_SPOOL_BACKEND or [spool] backend)")
    check(env.get("HUBGATE_CLIENT_AUTH") == "require", f"{label}: client auth required")
    for var in ("HUBGATE_VERIFY_TOKEN_FILE", "HUBGATE_APP_SECRET_FILE", "HUBGATE_SPOOL_URL_FILE", "HUBGATE_KEY"):
        src = mount_source(pod, c, env.get(var) or "", docs)
        ok = src is not None and src[0] == "Secret" and find(docs, "Secret", src[1]) is not None and src[2] in doc_values(find(docs, "Secret", src[1]))
        check(ok, f"{label}: {var} is a key of a mounted Secret {src[1:] if src else ''}")
    cfg_src = mount_source(pod, c, env.get("HUBGATE_CONFIG") or "", docs)
    check(cfg_src is not None and cfg_src[0] == "ConfigMap", f"{label}: HUBGATE_CONFIG is a mounted ConfigMap file")
    ca = conf.get("spool", {}).get("ca")
    if ca:
        src = mount_source(pod, c, ca, docs)
        check(src is not None and find(docs, src[0], src[1]) is not None and src[2] in doc_values(find(docs, src[0], src[1])), f"{label}: [spool] ca {ca} is a mounted file")
    upstream = env.get("HUBGATE_UPSTREAM") or ""
    host = re.match(r"https?://([^:/]+)", upstream)
    check(host is not None and host.group(1) not in LOOPBACK_HOSTS and ".svc" in host.group(1), f"{label}: HUBGATE_UPSTREAM is the app's cluster Service, not loopback ({upstream})")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        check(m.get("readOnly") is True, f"{label}: volume {m['name']} mounted read-only")
        if "secret" in v:
            check(find(docs, "Secret", v["secret"]["secretName"]) is not None, f"{label}: volume {m['name']}: Secret {v['secret']['secretName']} is defined")
        if "configMap" in v:
            check(find(docs, "ConfigMap", v["configMap"]["name"]) is not None, f"{label}: volume {m['name']}: ConfigMap {v['configMap']['name']} is defined")
    container_hardened(c, pod.get("securityContext", {}), label)
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, f"{label} pod: runAsNonRoot, runAsUser 10001 (the image's UID)")
    check(pod.get("automountServiceAccountToken") is False, f"{label} pod: no service account token mounted")
    return env


def pg_config(docs, env) -> dict:
    """The TOML of the ConfigMap file HUBGATE_CONFIG names ({} if none)."""
    for _, d in docs:
        if d["kind"] == "ConfigMap":
            for key, value in doc_values(d).items():
                if key.endswith(".toml"):
                    return tomllib.loads(value)
    return {}


def load_pg_sets(kdir: Path):
    kust, docs = load_k8s(kdir)
    mkust, mdocs = (None, [])
    if (kdir / "migrate/kustomization.yaml").is_file():
        mkust, mdocs = load_k8s(kdir / "migrate")
    return kust, docs, mkust, mdocs


def cmd_k8s_pg(kdir: Path, sidecar_dir: Path, repo: Path) -> None:
    known = known_env_pg(repo)
    kust, docs, mkust, mdocs = load_pg_sets(kdir)
    # Every manifest under the folder belongs to the gates' kustomization or migrate/'s.
    included = {(kdir / r).resolve() for r, _ in docs} | {(kdir / "migrate" / r).resolve() for r, _ in mdocs}
    strays = [str(p.relative_to(kdir)) for p in kdir.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in included]
    check(not strays, f"every manifest under {kdir.name}/ is in its kustomization or migrate/'s {strays or ''}")
    dep = find(docs, "Deployment")
    if not check(dep is not None, "a Deployment exists"):
        return finish()
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    check(spec["selector"]["matchLabels"].items() <= pod_labels.items(), "Deployment selector matches the pod labels")
    containers = {c["name"]: c for c in pod["containers"]}
    check(set(containers) == {"hubgate"}, "the pod runs hubgate alone (the app is a separate Service, not a sidecar)")
    hg = containers.get("hubgate")
    if hg is None:
        return finish()
    images = {i["name"]: i for i in kust.get("images", [])}
    check(hg["image"] in images, f"hubgate: image `{hg['image']}` is set by kustomization.yaml images:")
    for i in kust.get("images", []):
        check(str(i.get("newTag", "")) not in ("", "latest") and ":latest" not in i.get("newName", ""), f"image {i['name']}: pinned tag, not latest")

    conf = pg_config(docs, pod_env(hg))
    env = check_pg_container(pod, hg, docs, known, "hubgate", conf)
    ports = {p["name"]: p["containerPort"] for p in hg.get("ports", [])}
    check(ports.get("https") == 8443 and env.get("HUBGATE_LISTEN", "").endswith(":8443"), "hubgate: listens on 8443, port named https")
    check(ports.get("admin") == 9901 and env.get("HUBGATE_ADMIN_LISTEN") == "0.0.0.0:9901", "hubgate: admin on 0.0.0.0:9901 (kubelet probes the pod IP), port named admin")
    rp, lp, sp = hg.get("readinessProbe", {}), hg.get("livenessProbe", {}), hg.get("startupProbe")
    check(rp.get("httpGet", {}).get("path") == "/readyz" and rp["httpGet"].get("port") in ("admin", 9901), "hubgate: readinessProbe GET /readyz on the admin port")
    check(lp.get("httpGet", {}).get("path") == "/healthz" and lp["httpGet"].get("port") in ("admin", 9901), "hubgate: livenessProbe GET /healthz on the admin port (process liveness: a database outage restarts no gate)")
    if sp:
        check(sp.get("httpGet", {}).get("path") == "/healthz", "hubgate: startupProbe on /healthz, not on the database's readiness")

    # Several gates, spread, rolled one at a time.
    replicas = spec.get("replicas", 1)
    check(replicas >= 2, f"Deployment: replicas {replicas} >= 2")
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    check(ru.get("maxUnavailable") == 0, "Deployment: rollingUpdate maxUnavailable 0")
    spread = [t for t in pod.get("topologySpreadConstraints", []) if t.get("topologyKey") == "kubernetes.io/hostname" and t.get("whenUnsatisfiable") == "DoNotSchedule" and t.get("labelSelector", {}).get("matchLabels", {}).items() <= pod_labels.items()]
    anti = [t for t in pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", []) if t.get("topologyKey") == "kubernetes.io/hostname"]
    check(bool(spread or anti), "pod: gates spread over nodes (topologySpreadConstraints on kubernetes.io/hostname, DoNotSchedule, or required podAntiAffinity)")
    for t in spread:
        check(t.get("maxSkew") == 1 and "pod-template-hash" in t.get("matchLabelKeys", []), "pod: node spread maxSkew 1, per rollout revision (matchLabelKeys pod-template-hash: the surge pod fits)")

    ps = hg.get("lifecycle", {}).get("preStop", {})
    pre_stop = ps["sleep"]["seconds"] if "sleep" in ps else 0
    drain = duration_seconds(env.get("HUBGATE_DRAIN_TIMEOUT") or f"{DRAIN_SECONDS}s")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(pre_stop >= 1, f"hubgate: preStop sleep ({pre_stop}s) lets the endpoint leave the load balancer first")
    check(grace > pre_stop + drain + DELIVERY_STOP_SECONDS, f"pod: terminationGracePeriodSeconds {grace} > preStop {pre_stop} + drain {drain:g} + deliveries' stop {DELIVERY_STOP_SECONDS}")

    # The spool configuration file (a ConfigMap: nothing secret in it).
    sp_conf, dd_conf = conf.get("spool", {}), conf.get("dedupe", {})
    check(bool(conf), "hubgate.toml ConfigMap parses as TOML")
    check("url" not in sp_conf, "hubgate.toml: no [spool] url (the URL is in a Secret, not a ConfigMap)")
    check("path" not in sp_conf, "hubgate.toml: no [spool] path (postgres, not a SQLite file)")
    check(dd_conf.get("store") == "postgres", "hubgate.toml: [dedupe] store = postgres (a Meta retry on another gate is recognised)")
    lease = duration_seconds(sp_conf.get("lease", "30s"))
    accept = duration_seconds(sp_conf.get("accept_timeout", "3s"))
    check(0 < accept < META_TIMEOUT_SECONDS, f"hubgate.toml: accept_timeout {accept:g}s below Meta's {META_TIMEOUT_SECONDS}s (503 before Meta gives up)")
    check(lease >= DELIVERY_STOP_SECONDS, f"hubgate.toml: lease {lease:g}s >= the deliveries' stop {DELIVERY_STOP_SECONDS}s")
    check(int(sp_conf.get("pool_size", 16)) >= 1, "hubgate.toml: pool_size >= 1")
    for r in conf.get("route", []):
        check(all(isinstance(s, dict) for s in [r.get("verify_token", {}), *r.get("app_secrets", [])]), "hubgate.toml: no inline route secret")

    # Nothing secret outside Secrets; placeholders only.
    seen = set()
    for res, d in docs + mdocs:
        name = f"{d['kind']} {d['metadata']['name']}"
        if name in seen:  # config/ is in both kustomizations
            continue
        seen.add(name)
        if d["kind"] == "ConfigMap":
            check(not any(PG_URL.search(str(v)) for v in doc_values(d).values()), f"{name}: no postgres:// URL in a ConfigMap")
            if not any(k.endswith(".toml") for k in doc_values(d)):
                check(all(str(v).strip() == "REPLACE_ME" for v in doc_values(d).values()), f"{name}: every value is the placeholder REPLACE_ME")
        if d["kind"] == "Secret":
            check("data" not in d, f"{name}: placeholders in stringData, no base64 data")
            for k, v in doc_values(d).items():
                if PG_URL.match(str(v)):
                    check_url_placeholder(str(v), f"{name} {k}", bool(sp_conf.get("ca")))
                else:
                    check(str(v).strip() == "REPLACE_ME", f"{name} {k}: the placeholder REPLACE_ME")
    # Secrets and ConfigMaps shared with the sidecar topology: same names, same keys.
    _, side_docs = load_k8s(sidecar_dir)
    for _, d in side_docs:
        if d["kind"] in ("Secret", "ConfigMap"):
            mine = find(docs, d["kind"], d["metadata"]["name"])
            if mine is not None:
                check(set(doc_values(mine)) == set(doc_values(d)), f"{d['kind']} {d['metadata']['name']}: same keys as in {sidecar_dir.name}/ (one set of Secrets serves both)")

    # Service: TCP 443 -> 8443, as the sidecar topology's.
    svc = find(docs, "Service")
    side_svc = find(side_docs, "Service")
    if check(svc is not None, "a Service exists"):
        check(svc["spec"]["selector"].items() <= pod_labels.items(), "Service selector matches the pod")
        sp_ports = svc["spec"]["ports"]
        target = {p["port"]: p.get("targetPort") for p in sp_ports}
        check(len(sp_ports) == 1 and ports.get(target.get(443), target.get(443)) == 8443 and sp_ports[0].get("protocol", "TCP") == "TCP", "Service exposes only TCP 443 -> hubgate 8443")
        check(svc["spec"].get("type") == "LoadBalancer", "Service type LoadBalancer (layer 4: hubgate terminates TLS)")
        etp = svc["spec"].get("externalTrafficPolicy")
        check(side_svc is not None and etp == side_svc["spec"].get("externalTrafficPolicy"), f"Service externalTrafficPolicy {etp} as in {sidecar_dir.name}/")

    pdb = find(docs, "PodDisruptionBudget")
    if check(pdb is not None, "a PodDisruptionBudget exists"):
        check(pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "PodDisruptionBudget selector matches the pod")
        ma, mu = pdb["spec"].get("minAvailable"), pdb["spec"].get("maxUnavailable")
        if isinstance(ma, int):
            check(1 <= ma < replicas, f"PodDisruptionBudget minAvailable {ma}: keeps a gate and still lets a drain evict one (< replicas {replicas})")
        else:
            check(isinstance(mu, int) and 1 <= mu < replicas, f"PodDisruptionBudget maxUnavailable {mu}: keeps a gate, lets a drain evict one")

    netpol = find(docs, "NetworkPolicy")
    if check(netpol is not None, "a NetworkPolicy admits only the gates to the app"):
        froms = [f.get("podSelector", {}).get("matchLabels", {}) for rule in netpol["spec"].get("ingress", []) for f in rule.get("from", [])]
        check(froms and all(f and f.items() <= pod_labels.items() for f in froms), "NetworkPolicy: ingress only from pods with the gates' labels")
        port = re.match(r"https?://[^:/]+:(\d+)", env.get("HUBGATE_UPSTREAM", ""))
        np_ports = [p.get("port") for rule in netpol["spec"].get("ingress", []) for p in rule.get("ports", [])]
        check(port is not None and np_ports == [int(port.group(1))], f"NetworkPolicy: the port is HUBGATE_UPSTREAM's ({np_ports})")
        check(not netpol["spec"]["podSelector"].get("matchLabels", {}).items() <= pod_labels.items(), "NetworkPolicy: selects the app's pods, not the gates")

    # The optional migration Job (migrate/).
    job = find(mdocs, "Job")
    if check(mkust is not None and job is not None, "migrate/: a kustomization with the migration Job"):
        check([i for i in mkust.get("images", [])] == kust.get("images", []), "migrate/: the same images: as the gates' kustomization")
        check(find(mdocs, "ConfigMap", "hubgate-pg-config") == find(docs, "ConfigMap", "hubgate-pg-config"), "migrate/: the same config (folder config/ in both)")
        jpod = job["spec"]["template"]["spec"]
        jc = jpod["containers"]
        check(len(jc) == 1, "Job: one container")
        c = jc[0]
        check(c["image"] in images, f"Job: image `{c['image']}` is set by kustomization images:")
        check(c.get("args", [])[:2] == ["spool", "migrate"], "Job: runs `hubgate spool migrate`")
        alldocs = docs + mdocs
        jenv = check_pg_container(jpod, c, alldocs, known, "Job", conf)
        gate_url = mount_source(pod, hg, env.get("HUBGATE_SPOOL_URL_FILE", ""), docs)
        job_url = mount_source(jpod, c, jenv.get("HUBGATE_SPOOL_URL_FILE", ""), alldocs)
        check(gate_url is not None and job_url is not None and gate_url[1] != job_url[1], "Job: its URL (the owner role) is another Secret than the gates'")
        same = {k for k in env if k not in ("HUBGATE_SPOOL_URL_FILE", "HUBGATE_LISTEN", "HUBGATE_ADMIN_LISTEN")}
        diff = sorted(k for k in same | set(jenv) - {"HUBGATE_SPOOL_URL_FILE"} if env.get(k) != jenv.get(k))
        check(not diff, f"Job: the gates' configuration (same variables but the URL file) {diff or ''}")
        check(jpod.get("restartPolicy") in ("Never", "OnFailure"), "Job: restartPolicy Never/OnFailure")
        check(job["spec"].get("ttlSecondsAfterFinished") is not None, "Job: ttlSecondsAfterFinished (re-applied at the next upgrade)")
        check(job["spec"].get("activeDeadlineSeconds") is not None, "Job: activeDeadlineSeconds")
    finish()


def write_pg_config(conf_text: str, root: Path, out: Path, standin: bool) -> None:
    """hubgate.toml with /etc/hubgate/ under root; for the SQLite stand-in, without the keys
    only the PostgreSQL backend has, and with a spool path under root."""
    text = conf_text.replace("/etc/hubgate/", f"{root}/etc/hubgate/")
    if standin:
        kept, section = [], ""
        for line in text.splitlines():
            m = re.match(r"\s*\[([a-z_]+)\]", line)
            if m:
                section = m.group(1)
            key = re.match(r"\s*([a-z_0-9]+)\s*=", line)
            if key and ((section == "spool" and key.group(1) in PG_SPOOL_KEYS) or (section == "dedupe" and key.group(1) in PG_DEDUPE_KEYS)):
                continue
            kept.append(line)
            if section == "spool" and m:
                kept.append(f'path = "{root}/var/lib/hubgate/spool.db"')
        text = "\n".join(kept) + "\n"
        (root / "var/lib/hubgate").mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink():
        out.unlink()
    out.write_text(text)


def standin_env(env: dict, root: Path) -> dict:
    env = {k: v for k, v in env.items() if k not in PG_ENV}
    env["HUBGATE_SPOOL_PATH"] = f"{root}/var/lib/hubgate/spool.db"
    return env


TEST_SPOOL_URL = "postgres://hubgate:TEST-not-a-password@db.invalid:5432/hubgate?sslmode=verify-full\n"


def cmd_prepare_k8s_pg(kdir: Path, workload: str, pki: Path, repo: Path, root: Path, out: Path, mode: str) -> None:
    """Projects the volumes of the gates' container (workload `deployment`) or of the migration
    Job's (`job`) from the test PKI; mode `postgres` (exact environment) or `sqlite-standin`
    (for a hubgate that has no PostgreSQL backend yet: the same minus its keys and variables)."""
    standin = mode == "sqlite-standin"
    _, docs, _, mdocs = load_pg_sets(kdir)
    alldocs = docs + mdocs
    if workload == "deployment":
        pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    else:
        pod = find(mdocs, "Job")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        src = find(alldocs, "Secret", v["secret"]["secretName"]) if "secret" in v else find(alldocs, "ConfigMap", v["configMap"]["name"])
        for key, value in doc_values(src).items():
            target = under(root, m["mountPath"]) / key
            if key.endswith(".toml"):
                write_pg_config(str(value), root, target, standin)
            elif PG_URL.match(str(value)):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(TEST_SPOOL_URL)
            else:
                link(target, pki_file(pki, key, repo))
    env = pod_env(c)
    write_env(standin_env(env, root) if standin else env, root, out)
    print(f"  ok   kubernetes-postgres: the {workload}'s volumes projected under {root} ({mode})")
    finish()


# Compose (compose-postgres.yaml, after `docker-compose config --format json`)


def compose_gates(cfg) -> dict:
    return {n: s for n, s in cfg["services"].items() if str(s.get("image", "")).startswith("hubgate:")}


def check_compose_gate(name: str, hg: dict, services: dict, cfg: dict, known: set[str], dockerfile: Path) -> dict:
    """The checks compose.yaml's gate gets, for one gate service."""
    env = compose_env(hg)
    label = f"compose {name}"
    check_env_names(env, known, f"{label} environment")
    check(hg.get("read_only") is True, f"{label}: read_only: true")
    check(re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", str(hg.get("user", ""))) is not None, f"{label}: numeric non-root user")
    check(hg.get("cap_drop") == ["ALL"] and not hg.get("cap_add"), f"{label}: cap_drop ALL, nothing added")
    check(any("no-new-privileges" in s for s in hg.get("security_opt", [])), f"{label}: no-new-privileges")
    check(bool(hg.get("mem_limit")) and bool(hg.get("pids_limit")), f"{label}: mem_limit and pids_limit")
    check(bool(hg.get("healthcheck", {}).get("test")), f"{label}: healthcheck")
    check(dockerfile_healthcheck(dockerfile) == hg.get("healthcheck", {}).get("test"), f"{label}: healthcheck == the Dockerfile's HEALTHCHECK")
    check("HUBGATE_VERIFY_TOKEN" not in env and "HUBGATE_APP_SECRET" not in env and "HUBGATE_SPOOL_URL" not in env, f"{label}: no secret value in the environment (token, app secret, database URL)")
    check(not any(PG_URL.search(v) for v in env.values()), f"{label}: no postgres:// URL in the environment")
    secret_targets = {f"/run/secrets/{s['source']}" if not str(s.get("target", "")).startswith("/") else s["target"] for s in hg.get("secrets", [])}
    for var in ("HUBGATE_VERIFY_TOKEN_FILE", "HUBGATE_APP_SECRET_FILE", "HUBGATE_SPOOL_URL_FILE"):
        check(env.get(var) in secret_targets, f"{label}: {var} is a mounted compose secret")
    for v in hg.get("volumes", []):
        check(v.get("read_only") is True, f"{label}: {v['target']} mounted read-only")
    upstream_host = re.match(r"https?://([^:/]+)", env.get("HUBGATE_UPSTREAM", ""))
    check(upstream_host is not None and upstream_host.group(1) in services, f"{label}: HUBGATE_UPSTREAM names a compose service")
    check(env.get("HUBGATE_DELIVERY") == "spool" and env.get("HUBGATE_SPOOL_BACKEND") == "postgres", f"{label}: HUBGATE_DELIVERY=spool, HUBGATE_SPOOL_BACKEND=postgres")
    check(env.get("HUBGATE_CLIENT_AUTH") == "require", f"{label}: client auth required")
    published = {(p.get("host_ip", ""), int(p["target"])) for p in hg.get("ports", [])}
    check(("", 8443) in published or ("0.0.0.0", 8443) in published, f"{label}: 8443 published")
    check(all(ip == "127.0.0.1" for ip, t in published if t == 9901), f"{label}: admin 9901 published on loopback only")
    grace = duration_seconds(hg.get("stop_grace_period", "10s"))
    check(grace > DRAIN_SECONDS + DELIVERY_STOP_SECONDS, f"{label}: stop_grace_period {grace:g}s > drain {DRAIN_SECONDS}s + deliveries' stop {DELIVERY_STOP_SECONDS}s")
    dep = hg.get("depends_on", {})
    check(dep.get("postgres", {}).get("condition") == "service_healthy", f"{label}: depends_on postgres, condition service_healthy")
    return env


def cmd_compose_pg(cfg_path: Path, sidecar_cfg_path: Path, dockerfile: Path, repo: Path) -> None:
    known = known_env_pg(repo)
    cfg = json.loads(cfg_path.read_text())
    services = cfg["services"]
    gates = compose_gates(cfg)
    check(len(gates) >= 2, f"compose-postgres: two or more gates sharing the database ({sorted(gates)})")
    envs = {n: check_compose_gate(n, s, services, cfg, known, dockerfile) for n, s in gates.items()}
    check(len({json.dumps(e, sort_keys=True) for e in envs.values()}) == 1, "compose-postgres: every gate has the same environment")
    host_ports = [p.get("published") for s in gates.values() for p in s.get("ports", []) if int(p["target"]) == 8443]
    check(len(host_ports) == len(set(host_ports)) == len(gates), f"compose-postgres: each gate's 8443 on its own host port {host_ports}")
    admin_ports = [p.get("published") for s in gates.values() for p in s.get("ports", []) if int(p["target"]) == 9901]
    check(len(admin_ports) == len(set(admin_ports)), f"compose-postgres: each gate's admin on its own loopback port {admin_ports}")

    pg = services.get("postgres")
    if check(pg is not None, "compose-postgres: a postgres service"):
        image = str(pg.get("image", ""))
        check(re.fullmatch(r"postgres:1[5-9](\.[0-9]+)?(-[a-z0-9]+)?", image) is not None, f"postgres: image pinned to a major version >= 15, not latest ({image})")
        cmd = " ".join(pg.get("command") or [])
        check("synchronous_commit=on" in cmd, "postgres: synchronous_commit=on")
        check("fsync=off" not in cmd and "synchronous_commit=off" not in cmd and "full_page_writes=off" not in cmd, "postgres: no durability setting turned off")
        hc = pg.get("healthcheck", {}).get("test") or []
        check("pg_isready" in hc, "postgres: healthcheck with pg_isready")
        data = [v for v in pg.get("volumes", []) if v.get("target") == "/var/lib/postgresql/data"]
        check(len(data) == 1 and data[0].get("type") == "volume" and data[0].get("source") in (cfg.get("volumes") or {}), "postgres: data on a named volume")
        check(not pg.get("ports"), "postgres: not published")
        penv = compose_env(pg)
        check("POSTGRES_PASSWORD" not in penv and penv.get("POSTGRES_PASSWORD_FILE", "").startswith("/run/secrets/"), "postgres: password from a compose secret (POSTGRES_PASSWORD_FILE)")
        check("POSTGRES_HOST_AUTH_METHOD" not in penv, "postgres: no POSTGRES_HOST_AUTH_METHOD (trust)")
        check(pg.get("read_only") is True and pg.get("cap_drop") == ["ALL"], "postgres: read_only, cap_drop ALL")
        check(set(pg.get("cap_add") or []) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}, "postgres: only the capabilities its entrypoint needs to drop to the postgres user")
        check(any("no-new-privileges" in s for s in pg.get("security_opt", [])), "postgres: no-new-privileges")
        check(bool(pg.get("mem_limit")) and bool(pg.get("pids_limit")), "postgres: mem_limit and pids_limit")
        nets = cfg.get("networks") or {}
        pg_nets = set(pg.get("networks") or {})
        check(bool(pg_nets) and all(nets.get(n, {}).get("internal") is True for n in pg_nets), f"postgres: only on internal networks {sorted(pg_nets)}")
        for n, s in gates.items():
            check(bool(pg_nets & set(s.get("networks") or {})), f"compose {n}: shares a network with postgres")
        # The URL the gates get (the file behind the spool_url secret).
        url_secret = next((s["source"] for s in next(iter(gates.values())).get("secrets", []) if s["source"] == Path(envs[next(iter(gates))].get("HUBGATE_SPOOL_URL_FILE", "")).name), None)
        url_file = Path(cfg["secrets"][url_secret]["file"]) if url_secret else None
        if check(url_file is not None and url_file.is_file(), f"compose-postgres: the URL secret's file exists ({url_file})"):
            u = pg_url_parts(url_file.read_text())
            check(u.get("host") == "postgres", "compose-postgres: the URL's host is the postgres service")
            check(u.get("sslmode") in ("disable", "require", "verify-ca", "verify-full"), f"compose-postgres: the URL names an sslmode ({u.get('sslmode')})")
            if u.get("sslmode") == "disable":
                check(all(nets.get(n, {}).get("internal") is True for n in pg_nets), "compose-postgres: sslmode=disable only on an internal network")
            check(u.get("user") == penv.get("POSTGRES_USER") and u.get("db") == penv.get("POSTGRES_DB"), "compose-postgres: the URL's user and database are the ones postgres creates")
            pw_secret = Path(penv.get("POSTGRES_PASSWORD_FILE", "")).name
            pw_file = Path(cfg["secrets"].get(pw_secret, {}).get("file", "/nonexistent"))
            check(pw_file.is_file() and u.get("password") == pw_file.read_text().strip(), "compose-postgres: the URL's password is the database's (test PKI)")
    be = services.get("backend")
    sidecar = json.loads(sidecar_cfg_path.read_text())
    if check(be is not None, "compose-postgres: the sample backend"):
        check(be.get("command") == sidecar["services"]["backend"].get("command"), "compose-postgres backend: the same script as compose.yaml's")
        check(be.get("read_only") is True and be.get("cap_drop") == ["ALL"] and not be.get("ports"), "compose-postgres backend: read_only, cap_drop ALL, not published")
        check(str(be.get("user", "0")).split(":")[0] not in ("", "0", "root"), "compose-postgres backend: non-root user")
        check(not (set(be.get("networks") or {}) & set((pg or {}).get("networks") or {})), "compose-postgres backend: not on the database's network")
    for n, s in services.items():
        check(not str(s.get("image", "")).endswith(":latest") and ":" in str(s.get("image", "")), f"compose-postgres {n}: image tag pinned, not latest")
    finish()


def cmd_prepare_compose_pg(cfg_path: Path, service: str, root: Path, out: Path, mode: str) -> None:
    cfg = json.loads(cfg_path.read_text())
    hg = cfg["services"][service]
    for v in hg.get("volumes", []):
        if v["type"] == "bind":
            check(Path(v["source"]).exists(), f"compose: bind source {v['source']} exists")
            link(under(root, v["target"]), Path(v["source"]))
    for s in hg.get("secrets", []):
        target = s.get("target") or s["source"]
        target = target if target.startswith("/") else f"/run/secrets/{target}"
        src = Path(cfg["secrets"][s["source"]]["file"])
        check(src.is_file(), f"compose: secret file {src} exists")
        link(under(root, target), src)
    env = compose_env(hg)
    if mode == "sqlite-standin":
        env = standin_env(env, root)
        (root / "var/lib/hubgate").mkdir(parents=True, exist_ok=True)
    write_env(env, root, out)
    print(f"  ok   compose-postgres: {service}'s mounts and secrets laid out under {root} ({mode})")
    finish()


# ----------------------------------------------------------------------------------------------


def cmd_free_ports(n: int) -> None:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def main(argv: list[str]) -> None:
    cmd, *a = argv
    P = Path
    table = {
        "k8s": lambda: cmd_k8s(P(a[0]), P(a[1])),
        "prepare-k8s": lambda: cmd_prepare_k8s(P(a[0]), P(a[1]), P(a[2]), P(a[3]), P(a[4])),
        "compose": lambda: cmd_compose(P(a[0]), P(a[1]), P(a[2])),
        "prepare-compose": lambda: cmd_prepare_compose(P(a[0]), P(a[1]), P(a[2])),
        "compose-get": lambda: cmd_compose_get(P(a[0]), a[1]),
        "dockerfile": lambda: cmd_dockerfile(P(a[0])),
        "dockerignore": lambda: cmd_dockerignore(P(a[0]), P(a[1]), P(a[2])),
        "systemd": lambda: cmd_systemd(P(a[0]), P(a[1])),
        "prepare-example": lambda: cmd_prepare_example(P(a[0]), P(a[1]), P(a[2]), P(a[3])),
        "prepare-systemd": lambda: cmd_prepare_systemd(P(a[0]), P(a[1]), P(a[2]), P(a[3]), P(a[4]), P(a[5])),
        "strace": lambda: cmd_strace(P(a[0]), P(a[1]), *map(P, a[2:])),
        "k8s-pg": lambda: cmd_k8s_pg(P(a[0]), P(a[1]), P(a[2])),
        "prepare-k8s-pg": lambda: cmd_prepare_k8s_pg(P(a[0]), a[1], P(a[2]), P(a[3]), P(a[4]), P(a[5]), a[6]),
        "compose-pg": lambda: cmd_compose_pg(P(a[0]), P(a[1]), P(a[2]), P(a[3])),
        "prepare-compose-pg": lambda: cmd_prepare_compose_pg(P(a[0]), a[1], P(a[2]), P(a[3]), a[4]),
        "free-ports": lambda: cmd_free_ports(int(a[0])),
    }
    table[cmd]()


if __name__ == "__main__":
    main(sys.argv[1:])
