#!/usr/bin/env python3
"""Runs a real Orthanc (Debian package) as the test PACS, on loopback ports, in a directory.

    orthanc.py start --dir DIR --http-port P --dicom-port Q [--aet ORTHANC]
                     [--gateway AET@HOST:PORT] [--gateway-tls] [--tls-dir D]
                     [--webhook URL [--webhook-token-file F]] [--stable-age S] [--timeout 30]
    orthanc.py stop --dir DIR
    orthanc.py make-tls --dir D

start: writes DIR/orthanc.json and DIR/route.lua, starts `Orthanc DIR/orthanc.json` in the
background (log DIR/orthanc.log, pid DIR/orthanc.pid), waits until GET /system answers with
the requested ports, prints one JSON line {"pid", "http", "dicom_port", "aet", "ready_s"}.
On failure prints the log tail to stderr and exits 1 (Orthanc is then stopped).

route.lua (OnStableStudy): a study with a SEG or SR series, or a series whose Manufacturer is
"brats-platform", or no MR series, is left alone (this is what stops our own SEG being routed
back to the gateway). Otherwise: with --webhook, HttpPost(URL, {"study_instance_uid",
"orthanc_study"}) (pull mode; with --webhook-token-file, as "Authorization: Bearer <token>",
the gateway's [webhook] token_file secret); without, an asynchronous C-STORE job of the whole study to the
modality "brats" = --gateway (push mode). Only Orthanc study ids are logged.

--tls-dir D (ca.pem, orthanc.pem, orthanc.key; make-tls writes them): the DICOM port accepts only
mutual TLS (client certificate signed by ca.pem required). --gateway-tls: Orthanc also connects
to the gateway with TLS (needs --tls-dir).

make-tls: a throwaway CA (ca.pem/ca.key) and RSA-2048 leaf certificates signed by it, each with
subjectAltName IP:127.0.0.1, DNS:localhost and serverAuth+clientAuth: orthanc.pem/key (CN
ORTHANC), gateway.pem/key (CN BRATS), client.pem/key (CN STORESCU, for dcmtk). Uses `openssl`.

Stdlib only. See scripts/dicom/README.md, "Orthanc as the test PACS".
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

OWN_MANUFACTURER = "brats-platform"
MODALITY = "brats"
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


def die(msg: str, code: int = 1) -> None:
    print(f"orthanc.py: {msg}", file=sys.stderr)
    sys.exit(code)


def find_orthanc(explicit: str | None) -> str:
    """Debian installs Orthanc in /usr/sbin, which is not on a normal user's PATH."""
    for cand in [explicit, os.environ.get("ORTHANC_BIN"), shutil.which("Orthanc"), *ORTHANC_CANDIDATES]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    die("Orthanc binary not found (apt-get install orthanc orthanc-dicomweb; "
        "scripts/bootstrap.sh does it), or set ORTHANC_BIN")
    return ""


def find_dicomweb() -> str:
    for pattern in DICOMWEB_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    die("DICOMweb plugin libOrthancDicomWeb.so not found (apt-get install orthanc-dicomweb)")
    return ""


def parse_gateway(text: str) -> tuple[str, str, int]:
    m = re.fullmatch(r"([^@]{1,16})@([^:@]+):(\d{1,5})", text)
    if not m:
        die(f"--gateway must be AET@HOST:PORT (AET at most 16 characters), got {text!r}")
    return m.group(1), m.group(2), int(m.group(3))


def lua_str(s: str) -> str:
    """A Lua string literal for any text (decimal escapes for everything unusual)."""
    out = []
    for ch in s.encode("utf-8"):
        c = chr(ch)
        if c in '"\\' or ch < 0x20 or ch >= 0x7F:
            out.append("\\%03d" % ch)
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def port_free(port: int) -> bool:
    """Orthanc 1.10 binds both ports on 0.0.0.0 (no bind-address option): test that."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    """Whether some socket listens on the TCP port (IPv4 or IPv6), from /proc/net."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (FileNotFoundError, StopIteration):
            continue
    return False


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def pid_is_our_orthanc(pid: int, config: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return False
    return any(a == config for a in argv) and any(os.path.basename(a) == "Orthanc" for a in argv)


def log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


ROUTE_LUA = r"""-- Written by scripts/dicom/orthanc.py: auto-routing of stable MR studies to the gateway.
-- Mode: %(mode)s. Logs carry Orthanc study ids only, never patient or study tags.
local MODALITY = %(modality)s
local WEBHOOK = %(webhook)s
local WEBHOOK_TOKEN = %(webhook_token)s
local OWN_MANUFACTURER = %(manufacturer)s

-- Why a study must not be routed, or nil. SEG/SR series and series made by our platform are
-- results: routing them again would loop (Orthanc re-fires OnStableStudy when they arrive).
local function SkipReason(studyId)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local hasMr = false
  for _, s in ipairs(series) do
    local t = s['MainDicomTags'] or {}
    local modality = t['Modality']
    if modality == 'SEG' or modality == 'SR' then
      return 'contains a ' .. modality .. ' series'
    end
    if t['Manufacturer'] == OWN_MANUFACTURER then
      return 'contains a series made by ' .. OWN_MANUFACTURER
    end
    if modality == 'MR' then hasMr = true end
  end
  if not hasMr then return 'no MR series' end
  return nil
end

function OnStableStudy(studyId, tags, metadata)
  local ok, reason = pcall(SkipReason, studyId)
  if not ok then
    print('brats-route: study ' .. studyId .. ' not routed: cannot list its series')
    return
  end
  if reason ~= nil then
    print('brats-route: study ' .. studyId .. ' not routed: ' .. reason)
    return
  end
  if WEBHOOK ~= nil then
    local body = DumpJson({ study_instance_uid = tags['StudyInstanceUID'],
                            orthanc_study = studyId }, true)
    local headers = { ['Content-Type'] = 'application/json' }
    if WEBHOOK_TOKEN ~= nil then headers['Authorization'] = 'Bearer ' .. WEBHOOK_TOKEN end
    local ok, answer = pcall(HttpPost, WEBHOOK, body, headers)
    if ok and answer ~= nil then
      print('brats-route: study ' .. studyId .. ' announced to the webhook')
    else
      print('brats-route: study ' .. studyId .. ' webhook POST failed')
    end
  else
    local posted, answer = pcall(RestApiPost, '/modalities/' .. MODALITY .. '/store',
      '{"Resources":["' .. studyId .. '"],"Synchronous":false}')
    if posted and answer ~= nil then
      local job = ParseJson(answer)['ID'] or '?'
      print('brats-route: study ' .. studyId .. ' sent to ' .. MODALITY .. ' (job ' .. job .. ')')
    else
      print('brats-route: study ' .. studyId .. ' store job to ' .. MODALITY .. ' failed')
    end
  end
end
"""


def write_config(args: argparse.Namespace) -> tuple[str, dict]:
    d = os.path.abspath(args.dir)
    db = os.path.join(d, "db")
    os.makedirs(db, exist_ok=True)
    config_path = os.path.join(d, "orthanc.json")
    lua_path = os.path.join(d, "route.lua")

    modalities = {}
    if args.gateway:
        aet, host, port = parse_gateway(args.gateway)
        modalities[MODALITY] = {"AET": aet, "Host": host, "Port": port}
        if args.gateway_tls:
            modalities[MODALITY]["UseDicomTls"] = True
    elif not args.webhook:
        print("orthanc.py: no --gateway and no --webhook: nothing will be routed", file=sys.stderr)

    token = None
    if args.webhook_token_file:
        with open(args.webhook_token_file) as f:
            token = f.read().strip()
        if not token:
            die(f"--webhook-token-file {args.webhook_token_file} is empty")
    mode = "webhook (pull)" if args.webhook else ("push to " + MODALITY if args.gateway else "none")
    with open(lua_path, "w") as f:
        f.write(ROUTE_LUA % {
            "mode": mode,
            "modality": lua_str(MODALITY),
            "webhook": lua_str(args.webhook) if args.webhook else "nil",
            "webhook_token": lua_str(token) if token else "nil",
            "manufacturer": lua_str(OWN_MANUFACTURER),
        })

    cfg = {
        "Name": "brats-test-pacs",
        "StorageDirectory": db,
        "IndexDirectory": db,
        "StorageCompression": False,
        "Plugins": [find_dicomweb()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                     "WadoRoot": "/wado", "Ssl": False},
        "HttpServerEnabled": True,
        "HttpPort": args.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "HttpDescribeErrors": True,
        "HttpTimeout": 10,
        "DicomServerEnabled": True,
        "DicomAet": args.aet,
        "DicomPort": args.dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "UnknownSopClassAccepted": True,
        "DicomScuTimeout": 10,
        "DicomModalities": modalities,
        "DicomModalitiesInDatabase": False,
        "StableAge": args.stable_age,
        "LuaScripts": [lua_path],
        "ExecuteLuaEnabled": False,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "LogExportedResources": False,
        "DeidentifyLogs": True,
    }
    # Orthanc's built-in default is the configuration folder (log: "HTTPS will use the CA
    # certificates from this file: DIR"); only matters for an https:// --webhook.
    if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        cfg["HttpsCACertificates"] = "/etc/ssl/certs/ca-certificates.crt"
    if args.tls_dir:
        t = os.path.abspath(args.tls_dir)
        files = {k: os.path.join(t, n) for k, n in
                 (("ca", "ca.pem"), ("cert", "orthanc.pem"), ("key", "orthanc.key"))}
        missing = [p for p in files.values() if not os.path.isfile(p)]
        if missing:
            die(f"--tls-dir lacks {', '.join(missing)} (orthanc.py make-tls --dir {args.tls_dir})")
        cfg.update({
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": files["cert"],
            "DicomTlsPrivateKey": files["key"],
            "DicomTlsTrustedCertificates": files["ca"],
            "DicomTlsRemoteCertificateRequired": True,
        })
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return config_path, cfg


def get_system(http: str) -> dict | None:
    try:
        with urllib.request.urlopen(http + "/system", timeout=1) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def stop_pid(pid: int, config: str, wait_s: float = 15.0) -> bool:
    """SIGTERM (Orthanc shuts down cleanly), SIGKILL after wait_s. False if it was not running."""
    if not pid_alive(pid) or not pid_is_our_orthanc(pid, config):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    while pid_alive(pid):
        time.sleep(0.05)
    return True


def cmd_start(args: argparse.Namespace) -> None:
    if args.gateway_tls and not args.tls_dir:
        die("--gateway-tls needs --tls-dir (Orthanc's own certificate and the CA)")
    if args.stable_age < 1:
        die("--stable-age must be at least 1 (Orthanc counts whole seconds)")
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    pid_path = os.path.join(d, "orthanc.pid")
    log_path = os.path.join(d, "orthanc.log")
    config_path = os.path.join(d, "orthanc.json")
    if os.path.exists(pid_path):
        old = int(open(pid_path).read().strip() or 0)
        if old and pid_alive(old) and pid_is_our_orthanc(old, config_path):
            die(f"an Orthanc of {d} already runs (pid {old}); orthanc.py stop --dir {args.dir}")
        os.unlink(pid_path)
    for name, port in (("--http-port", args.http_port), ("--dicom-port", args.dicom_port)):
        if not port_free(port):
            die(f"{name} {port} is in use")
    binary = find_orthanc(args.orthanc)
    config_path, _ = write_config(args)

    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        # Orthanc's DIMSE is DCMTK's, which sets TCP_NODELAY only when this variable is set;
        # without it every C-STORE Orthanc sends waits ~40 ms (Nagle against delayed ACK).
        env = {**os.environ, "TCP_NODELAY": "1"}
        proc = subprocess.Popen([binary, config_path], cwd=d, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=env)
    with open(pid_path, "w") as f:
        f.write(f"{proc.pid}\n")

    http = f"http://127.0.0.1:{args.http_port}"
    deadline = t0 + args.timeout
    while True:
        if proc.poll() is not None:
            sys.stderr.write(log_tail(log_path))
            os.unlink(pid_path)
            die(f"Orthanc exited with status {proc.returncode} before answering (log {log_path})")
        sysinfo = get_system(http)
        if sysinfo and sysinfo.get("DicomPort") == args.dicom_port \
                and sysinfo.get("HttpPort") == args.http_port:
            break
        if time.monotonic() > deadline:
            sys.stderr.write(log_tail(log_path))
            stop_pid(proc.pid, config_path)
            os.unlink(pid_path)
            die(f"Orthanc did not answer GET {http}/system within {args.timeout} s (log {log_path})")
        time.sleep(0.05)
    # Orthanc opens its DICOM port before its HTTP port; check it listens anyway, without
    # connecting (with TLS on, a bare connect logs "TLS error: unexpected eof" in orthanc.log).
    while not listening(args.dicom_port):
        if time.monotonic() > deadline:
            sys.stderr.write(log_tail(log_path))
            stop_pid(proc.pid, config_path)
            os.unlink(pid_path)
            die(f"Orthanc's DICOM port {args.dicom_port} did not open within {args.timeout} s")
        time.sleep(0.05)
    print(json.dumps({"pid": proc.pid, "http": http, "dicom_port": args.dicom_port,
                      "aet": args.aet, "version": sysinfo.get("Version"),
                      "ready_s": round(time.monotonic() - t0, 3)}), flush=True)


def cmd_stop(args: argparse.Namespace) -> None:
    d = os.path.abspath(args.dir)
    pid_path = os.path.join(d, "orthanc.pid")
    if not os.path.exists(pid_path):
        print(json.dumps({"stopped": None}))
        return
    pid = int(open(pid_path).read().strip() or 0)
    t0 = time.monotonic()
    stopped = stop_pid(pid, os.path.join(d, "orthanc.json"), args.wait)
    os.unlink(pid_path)
    print(json.dumps({"stopped": pid if stopped else None,
                      "stop_s": round(time.monotonic() - t0, 3)}))


LEAVES = (("orthanc", "ORTHANC"), ("gateway", "BRATS"), ("client", "STORESCU"))


def cmd_make_tls(args: argparse.Namespace) -> None:
    openssl = shutil.which("openssl") or die("openssl not found")
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)

    def run(*argv: str) -> None:
        r = subprocess.run([openssl, *argv], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            die(f"openssl {' '.join(argv)} failed:\n{r.stderr}")

    days = str(args.days)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", days, "-subj", "/CN=brats-test-ca", "-sha256",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ext = os.path.join(d, "leaf.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth,clientAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in LEAVES:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={cn}", "-sha256")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", days,
            "-sha256", "-extfile", ext, "-out", f"{name}.pem")
        os.unlink(os.path.join(d, f"{name}.csr"))
    os.unlink(ext)
    for f in glob.glob(os.path.join(d, "*.key")):
        os.chmod(f, 0o600)
    print(json.dumps({"dir": d, "ca": "ca.pem", **{n: [f"{n}.pem", f"{n}.key"] for n, _ in LEAVES}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="write the configuration and start Orthanc")
    s.add_argument("--dir", required=True)
    s.add_argument("--http-port", type=int, required=True)
    s.add_argument("--dicom-port", type=int, required=True)
    s.add_argument("--aet", default="ORTHANC")
    s.add_argument("--gateway", help="AET@HOST:PORT of the gateway's C-STORE SCP (modality 'brats')")
    s.add_argument("--gateway-tls", action="store_true", help="Orthanc -> gateway over DICOM TLS")
    s.add_argument("--tls-dir", help="ca.pem, orthanc.pem, orthanc.key: Orthanc's DICOM port is TLS-only")
    s.add_argument("--webhook", help="pull mode: POST {study_instance_uid, orthanc_study} here")
    s.add_argument("--webhook-token-file", help="send its content as 'Authorization: Bearer <token>'")
    s.add_argument("--stable-age", type=int, default=2, help="seconds (default 2; Orthanc's is 60)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for GET /system")
    s.add_argument("--orthanc", help="Orthanc binary (default: $ORTHANC_BIN, PATH, /usr/sbin/Orthanc)")
    s.set_defaults(func=cmd_start)
    t = sub.add_parser("stop", help="stop the Orthanc started in DIR and wait for it")
    t.add_argument("--dir", required=True)
    t.add_argument("--wait", type=float, default=15.0, help="seconds before SIGKILL")
    t.set_defaults(func=cmd_stop)
    m = sub.add_parser("make-tls", help="throwaway CA + certificates for DICOM TLS tests")
    m.add_argument("--dir", required=True)
    m.add_argument("--days", type=int, default=30)
    m.set_defaults(func=cmd_make_tls)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
