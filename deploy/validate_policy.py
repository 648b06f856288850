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
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    docs = []
    for res in kust.get("resources", []):
        path = kdir / res
        if not check(path.is_file(), f"kustomization resource {res} exists"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((res, doc))
    listed = {r for r in kust.get("resources", [])}
    on_disk = {p.name for p in kdir.glob("*.yaml")} - {"kustomization.yaml"}
    check(on_disk <= listed, f"every manifest is listed in kustomization.yaml {sorted(on_disk - listed) or ''}")
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
        "free-ports": lambda: cmd_free_ports(int(a[0])),
    }
    table[cmd]()


if __name__ == "__main__":
    main(sys.argv[1:])
