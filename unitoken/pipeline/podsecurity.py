"""The Pod Security Standards' "restricted" profile, checked offline on a pod spec.

A namespace labelled ``pod-security.kubernetes.io/enforce: restricted`` refuses every pod that
breaks one of these rules (Kubernetes 1.25+, policy version ``latest``). The checks mirror the
admission controller's own (k8s.io/pod-security-admission/policy, one function per check; the
names below are its check ids), so a pod that passes here is admitted there.

Why our own: the only checker that runs offline here is the admission library itself, in Go.
PyPI's IaC scanners (checkov and the like) apply their own rule catalogues, which overlap the
profile without being it, and pull dependency sets our pins cannot take.

    violations = restricted_violations(pod_spec)   # [] when admitted
"""

from __future__ import annotations

from collections.abc import Iterator

# the volume types "restricted" allows (everything else, hostPath included, is refused)
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
_VOLUME_META = {"name"}


def _containers(pod: dict) -> Iterator[tuple[str, dict]]:
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(kind) or []:
            yield f"{kind}[{c.get('name', '?')}]", c


def _effective(pod: dict, container: dict, key: str):
    """A container's setting, else the pod's (pod-level securityContext is the default)."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (pod.get("securityContext") or {}).get(key)


def restricted_violations(pod: dict) -> list[str]:
    """Every rule of the restricted profile ``pod`` (a PodSpec as a dict) breaks, one line each
    naming the check, the container or volume, and what to set."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    # --- baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"hostNamespaces: {key}=true; fix: remove it")
    for name, c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"privileged: {name}; fix: privileged: false")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"procMount: {name} procMount={sc['procMount']}; fix: Default")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"hostPorts: {name} hostPort {port['hostPort']}; fix: remove it")
        for opts in (sc.get("seLinuxOptions"),):
            if opts and (opts.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t",
                                                   "container_engine_t") or opts.get("user") or opts.get("role")):
                out.append(f"seLinuxOptions: {name}; fix: leave user/role unset and use a container_* type")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor == "Unconfined":
            out.append(f"appArmorProfile: {name} is Unconfined; fix: RuntimeDefault or Localhost")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctls: {sysctl.get('name')} is not in the safe set; fix: remove it")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("appArmorProfile: the pod is Unconfined; fix: RuntimeDefault or Localhost")
    # --- restricted
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - _VOLUME_META
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"restrictedVolumes: volume {vol.get('name')} is {', '.join(sorted(kinds - ALLOWED_VOLUMES))}; "
                       f"fix: use one of {', '.join(sorted(ALLOWED_VOLUMES))}")
    if psc.get("runAsUser") == 0:
        out.append("runAsUser: the pod sets runAsUser=0; fix: the image's non-root uid")
    for name, c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"allowPrivilegeEscalation: {name} does not set it to false; fix: "
                       "securityContext.allowPrivilegeEscalation: false")
        if _effective(pod, c, "runAsNonRoot") is not True:
            out.append(f"runAsNonRoot: neither {name} nor the pod sets runAsNonRoot: true; fix: set it")
        if sc.get("runAsUser") == 0:
            out.append(f"runAsUser: {name} sets runAsUser=0; fix: the image's non-root uid")
        seccomp = (_effective(pod, c, "seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"seccompProfile: {name} has {seccomp or 'none'}; fix: seccompProfile.type: RuntimeDefault")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"capabilities: {name} does not drop ALL; fix: capabilities.drop: [ALL]")
        extra = [a for a in caps.get("add") or [] if a != "NET_BIND_SERVICE"]
        if extra:
            out.append(f"capabilities: {name} adds {', '.join(extra)}; fix: add at most NET_BIND_SERVICE")
    return out
