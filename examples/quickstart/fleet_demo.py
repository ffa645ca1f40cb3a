"""edgeship end to end on one machine: build, sign, serve, roll out, hot-swap, refuse, report.

What it does, each step through the real command-line tools:

1. trains the digits classifier (scikit-learn's bundled digits) and exports ONNX;
2. makes a root key, a release (bundle-signing) key and trust root v1, which the devices
   boot from, and each device's decryption key (`edgeship-agent keygen`);
3. builds and signs three bundles: v1 (float32), v2 (static int8, gated against v1's
   accuracy, its payload encrypted for the two devices), and v3, which is fine on the
   build machine but carries a latency budget no device can meet, so the device's own
   health check refuses it; and shows that a build missing its gate writes nothing and
   that a tampered copy does not verify;
4. starts a broker (a private mosquitto on a free loopback port, unless --broker is
   given), a bundle server (`edgeship serve`), a collector (`edgeship collect`) and two
   device agents (`edgeship-agent run`), each with its local HTTP endpoint on;
5. sends prediction traffic to both devices the whole time, and rolls v1 out, then v2
   (hot swap under that traffic), then v3 (refused on the device, rolled back, the
   rollout halts);
6. rotates the release key over the air: trust root v2, signed with the root key, trusts
   a new release key and revokes the old one (`edgeship trust revoke`, `trust publish`);
   both devices take it up, one refuses a bundle signed with the revoked key, and v5,
   signed with the new key, rolls out;
7. gives each device a second model (the TFLite twin, run by LiteRT beside the ONNX
   model), then rolls out a broken retrain and a sound one with a shadow stage: the
   devices reject the first on live traffic (it never answers a request) and promote the
   second (examples/quickstart/models_demo.py);
8. prints the fleet status and writes the HTML fleet report.

Every process it starts is stopped at the end, also on failure or Ctrl-C.

    python examples/quickstart/fleet_demo.py [--out out/fleet-demo] [--broker mqtt://HOST:PORT]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models_demo import models_and_shadow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PASSPHRASE_ENV = "EDGESHIP_DEMO_PASSPHRASE"
FLEET = "demo"
DEVICES = ("demo-1", "demo-2")
T = TypeVar("T")


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of the project's commands, echoing it, with its output passed through."""
    shown = " ".join(str(a) for a in argv)
    print(f"$ {shown}", flush=True)
    env = {**os.environ, PASSPHRASE_ENV: os.environ.get(PASSPHRASE_ENV, "demo-passphrase")}
    result = subprocess.run([str(a) for a in argv], env=env, text=True, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {shown}")
    return result


@contextmanager
def background(name: str, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running process, stopped with SIGTERM (then SIGKILL) when the block ends."""
    out = log.open("wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started {name} (pid {proc.pid}, log {log})", flush=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()
        print(f"stopped {name} (exit {proc.returncode})", flush=True)


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class Traffic(threading.Thread):
    """Prediction requests to one device's HTTP endpoint, counting answers and failures."""

    def __init__(self, port: int, token: str, samples: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.port, self.token, self.samples = port, token, samples
        self.stop_event = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.no_model = 0  # 503 before the first version is installed: expected

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        i = 0
        while not self.stop_event.is_set():
            body = json.dumps({"inputs": {"x": self.samples[i % len(self.samples)][None].tolist()}})
            i += 1
            try:
                conn.request(
                    "POST",
                    "/v1/predict",
                    body=body,
                    headers={
                        "Authorization": f"Bearer {self.token}",
                        "Content-Type": "application/json",
                    },
                )
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append(f"connection: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                time.sleep(0.2)
                continue
            if response.status == 200:
                self.ok += 1
            elif response.status == 503 and self.ok == 0:
                self.no_model += 1
                time.sleep(0.2)
            else:
                self.failed.append(f"HTTP {response.status}: {payload[:200]!r}")
            # About 40 requests/s per device: steady load, below the endpoint's per-client
            # rate limit (100/s by default), which would answer 429.
            time.sleep(0.025)
        conn.close()


def wait_until(what: str, check: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    """Poll ``check`` until it returns something other than None."""
    deadline = time.monotonic() + timeout_s
    while (found := check()) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)
    return found


def rotate_the_release_key(
    out: Path,
    *,
    data: Path,
    root_1: Path,
    broker_url: str,
    serve_port: int,
    rollout: Callable[..., None],
) -> None:
    """Steps 8-9: trust root v2 trusts a new release key and revokes the old one; the
    devices take it up over MQTT; a bundle the old key signs is refused, v5 installs."""
    # Imported here: the rest of the demo drives the SDK only through its commands; this
    # is only how the demo waits for what the devices report to the collector.
    from sdk.fleet.status import fleet_status  # noqa: PLC0415
    from sdk.fleet.store import open_store  # noqa: PLC0415

    edgeship, agent_cli = str(BIN / "edgeship"), str(BIN / "edgeship-agent")
    keys, bundles, root_2 = out / "keys", out / "bundles", out / "root-2.json"
    broker = ["--broker", broker_url, "--fleet", FLEET]

    say("8. rotate the release key: trust root v2 trusts release-2 and revokes release")
    run(edgeship, "keygen", keys / "release-2", "--passphrase-env", PASSPHRASE_ENV)
    # As after a leak: root v2 drops the old key and adds the new one in one step, signed
    # with the root key (which never signs bundles). `trust publish` checks that root v1
    # accepts it, writes bundles/root/2.json for the bundle server and publishes it,
    # retained, on the broker, where the running agents get it.
    run(edgeship, "trust", "revoke", root_1, keys / "release.pub",
        "--add-bundle-key", keys / "release-2.pub", "--sign", keys / "root",
        "--passphrase-env", PASSPHRASE_ENV, "--out", root_2)  # fmt: skip
    run(edgeship, "trust", "publish", root_2, "--previous", root_1, "--dir", bundles, *broker)

    def roots() -> dict[str, int | None]:
        store = open_store(str(out / "fleet.sqlite"))
        try:
            rows = fleet_status(store, now=time.time(), fleet=FLEET)
        finally:
            store.close()
        return {r.device: r.root_version for r in rows}

    wait_until(
        "both devices to report trust root v2",
        lambda: True if all(roots().get(d) == 2 for d in DEVICES) else None,
    )
    # Both still serve v2, which only the revoked key signed: with the root's default
    # `unvouched = keep-serving` they keep it (and report it) until step 9's v5 arrives.
    run(edgeship, "fleet", "status", "--db", out / "fleet.sqlite")

    say("9. a bundle signed with the revoked key is refused on the device; v5 (release-2) installs")

    def build(version: str, sequence: str, key: Path, name: str) -> None:
        run(edgeship, "build", data / "digits.onnx",
            "--metadata", ROOT / "examples" / "quickstart" / "digits.toml",
            "--key", key, "--passphrase-env", PASSPHRASE_ENV,
            "--golden-inputs", data / "validation.npz",
            "--version", version, "--sequence", sequence, "--out", bundles / name)  # fmt: skip

    # What whoever holds the old key can still sign: a higher sequence than anything the
    # devices run. It goes straight to demo-1 (no --trust: that would refuse it here).
    build("4.0.0", "4", keys / "release", "digits-v4-old-key.edgeship")
    build("5.0.0", "5", keys / "release-2", "digits-v5.edgeship")
    device, config = DEVICES[0], out / "devices" / f"{DEVICES[0]}.toml"
    sent = time.time()
    run(edgeship, "publish", bundles / "digits-v4-old-key.edgeship",
        "--url", f"http://127.0.0.1:{serve_port}/digits-v4-old-key.edgeship",
        "--device", device, *broker)  # fmt: skip

    def refused() -> dict[str, Any] | None:
        status = subprocess.run(
            [agent_cli, "status", "--config", str(config), "--json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        doc: dict[str, Any] = json.loads(status.stdout)
        failure = doc["last_failure"]
        return None if failure is None or failure["time"] < sent else doc

    # The device's own view: what it serves, the root in force and why it refused.
    doc = wait_until(f"{device} to refuse the bundle", refused)
    run(agent_cli, "status", "--config", config)
    reason, serving = doc["last_failure"]["reason"], doc["current"]["version"]
    if "trust root v2 trusts" not in reason or serving != "2.0.0":
        raise SystemExit(f"{device} serves {serving} and refused the bundle because: {reason}")
    print(f"({device} refused it and still serves {serving}; now v5, signed with release-2:)")
    # One wave: the point here is the new key, not the staging (steps 5-7 show that).
    rollout("v5", root_2, waves="100%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fleet-demo")
    parser.add_argument(
        "--broker", help="use this broker (mqtt://HOST:PORT) instead of starting one"
    )
    args = parser.parse_args()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "bundles").mkdir(parents=True)
    edgeship, agent_cli = str(BIN / "edgeship"), str(BIN / "edgeship-agent")
    key = out / "keys" / "release"
    root_key = out / "keys" / "root"
    signed_by_root: list[str | Path] = ["--sign", root_key, "--passphrase-env", PASSPHRASE_ENV]

    say("1. train the digits classifier and export it to ONNX")
    run(sys.executable, ROOT / "examples" / "digits" / "train.py", "--out", out / "digits")
    data = out / "digits"

    say("2. a root key, a release key and trust root v1 every device gets; each device's own key")
    # The devices boot from a signed root rather than a bare trust policy, so that step 8 can
    # change their keys over the air. One root key keeps the demo short; a real fleet holds
    # k of n root keys offline, one per person (docs/keys.md).
    run(edgeship, "keygen", root_key, "--passphrase-env", PASSPHRASE_ENV)
    run(edgeship, "keygen", key, "--passphrase-env", PASSPHRASE_ENV)
    root_1 = out / "root-1.json"
    run(edgeship, "trust", "init", "--root-key", f"{root_key}.pub", "--bundle-key",
        f"{key}.pub", "--fleet", FLEET, *signed_by_root, "--out", root_1)  # fmt: skip
    device_keys = {d: out / "devices" / f"{d}.key" for d in DEVICES}
    (out / "devices").mkdir()
    for device_key in device_keys.values():
        run(agent_cli, "keygen", "--out", device_key)

    say(
        "3. build and sign v1 (float32), v2 (static int8, gated, encrypted for the devices)"
        " and v3 (will fail on device)"
    )
    common: list[str | Path] = [
        "--metadata",
        ROOT / "examples" / "quickstart" / "digits.toml",
        "--key",
        key,
        "--passphrase-env",
        PASSPHRASE_ENV,
        "--golden-inputs",
        data / "validation.npz",
    ]
    run(
        edgeship,
        "build",
        data / "digits.onnx",
        *common,
        "--version",
        "1.0.0",
        "--sequence",
        "1",
        "--out",
        out / "bundles" / "digits-v1.edgeship",
    )
    run(
        edgeship,
        "build",
        data / "digits.onnx",
        *common,
        "--version",
        "2.0.0",
        "--sequence",
        "2",
        "--quantize",
        "static",
        "--calibration",
        data / "calibration.npz",
        "--validation",
        data / "validation.npz",
        "--max-accuracy-drop",
        "1.0",
        "--min-agreement",
        "0.97",
        # A 10 us MLP: int8 buys size, not speed (docs/benchmarks.md). The default gate
        # "not slower than fp32" is lifted, and the bundle records that it was.
        "--max-latency-ratio",
        "off",
        *[arg for k in device_keys.values() for arg in ("--encrypt-for", f"{k}.pub")],
        "--out",
        out / "bundles" / "digits-v2.edgeship",
    )
    # Sound on the build machine, but its p95 budget (1 µs) is beyond any device: the
    # device's health gate refuses it and keeps serving v2.
    run(
        edgeship,
        "build",
        data / "digits.onnx",
        *common,
        "--version",
        "3.0.0",
        "--sequence",
        "3",
        "--latency-budget-ms",
        "0.001",
        "--out",
        out / "bundles" / "digits-v3.edgeship",
    )

    say("3b. what must not ship does not: a missed gate, a tampered copy")
    if (
        run(
            edgeship,
            "build",
            data / "digits.onnx",
            *common,
            "--version",
            "2.1.0",
            "--sequence",
            "4",
            "--quantize",
            "dynamic",
            "--validation",
            data / "validation.npz",
            "--max-size-mb",
            "0.01",
            "--out",
            out / "too-big.edgeship",
            check=False,
        ).returncode
        == 0
    ):
        raise SystemExit("a build that missed its gate succeeded")
    assert not (out / "too-big.edgeship").exists()
    tampered = bytearray((out / "bundles" / "digits-v1.edgeship").read_bytes())
    tampered[-20000] ^= 0x01  # one bit inside the model
    (out / "tampered.edgeship").write_bytes(bytes(tampered))
    if (
        run(
            edgeship,
            "verify",
            out / "tampered.edgeship",
            "--trust",
            root_1,
            check=False,
        ).returncode
        == 0
    ):
        raise SystemExit("a tampered bundle verified")
    print("(both refused, as they must be)")

    samples = np.load(data / "validation.npz")["x"]
    with ExitStack() as stack:
        say("4. broker, bundle server, collector and two device agents")
        broker_url = args.broker
        if broker_url is None:
            port = free_port()
            conf = out / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                "max_queued_messages 100000\npersistence false\n"
                + ("user root\n" if os.geteuid() == 0 else "")
            )
            mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            stack.enter_context(
                background("mosquitto", [mosquitto, "-c", str(conf)], out / "mosquitto.log")
            )
            wait_for_port(port)
            broker_url = f"mqtt://127.0.0.1:{port}"
        serve_port = free_port()
        metrics_port = free_port()  # the collector's Prometheus /metrics
        stack.enter_context(
            background(
                "bundle server",
                [edgeship, "serve", str(out / "bundles"), "--port", str(serve_port)],
                out / "serve.log",
            )
        )
        wait_for_port(serve_port)
        stack.enter_context(
            background(
                "collector",
                [
                    edgeship,
                    "collect",
                    "--broker",
                    broker_url,
                    "--fleet",
                    FLEET,
                    "--db",
                    str(out / "fleet.sqlite"),
                    "--metrics-port",
                    str(metrics_port),
                ],
                out / "collect.log",
            )
        )
        wait_for_port(metrics_port)
        token = secrets.token_urlsafe(24)
        traffic: list[Traffic] = []
        ports: list[int] = []
        for device in DEVICES:
            http_port = free_port()
            state = out / "devices" / device
            state.mkdir(parents=True)
            (state.parent / f"{device}.token").write_text(token)
            config = state.parent / f"{device}.toml"
            config.write_text(
                f'device_id = "{device}"\nfleet = "{FLEET}"\nstate_dir = "{state}"\n'
                f'trust_policy = "{root_1}"\n'
                f'decryption_key = "{device_keys[device]}"\n\n'
                f'[broker]\nurl = "{broker_url}"\n\n'
                # Where a device that missed a root fetches it (root/N.json), beside the
                # retained latest root on the broker.
                f'[trust]\nserver_url = "http://127.0.0.1:{serve_port}/"\n\n'
                "[telemetry]\ninterval_s = 2.0\n\n"
                f"[http]\nenabled = true\nport = {http_port}\nmetrics = true\n"
                f'token_file = "{state.parent / f"{device}.token"}"\n\n'
                '[logging]\nformat = "text"\n\n'
                f'[attributes]\nsite = "demo"\n\n'
                # Two models: "default" keeps the device-level topics and state_dir (the
                # rollouts above address it), "lite" is the TFLite twin (step 10).
                "[models.default]\n[models.lite]\n"
            )
            stack.enter_context(
                background(
                    device, [agent_cli, "run", "--config", str(config)], out / f"{device}.log"
                )
            )
            wait_for_port(http_port)
            ports.append(http_port)
            t = Traffic(http_port, token, samples)
            t.start()
            traffic.append(t)
        (out / "groups.toml").write_text(f"[groups]\ndemo = {json.dumps(list(DEVICES))}\n")

        def rollout(
            version: str,
            trust: Path,
            *,
            waves: str = "50%,100%",
            expect_halt: bool = False,
            model: str = "default",
            extra: tuple[str, ...] = (),
        ) -> None:
            result = run(
                edgeship,
                "rollout",
                out / "bundles" / f"digits-{version}.edgeship",
                "--url",
                f"http://127.0.0.1:{serve_port}/digits-{version}.edgeship",
                "--trust",
                trust,
                "--broker",
                broker_url,
                "--fleet",
                FLEET,
                "--groups",
                out / "groups.toml",
                "--group",
                "demo",
                "--waves",
                waves,
                "--max-failure-rate",
                "0",
                "--min-healthy-time",
                "2",
                "--wave-timeout",
                "90",
                "--db",
                out / "fleet.sqlite",
                "--model",
                model,
                *extra,
                check=False,
            )
            halted = result.returncode == 2
            if result.returncode not in (0, 2) or halted != expect_halt:
                raise SystemExit(f"rollout of {version} ended with exit {result.returncode}")

        say("5. roll out v1: both devices install, health-check and serve it")
        rollout("v1", root_1)
        say("6. roll out v2 while traffic flows: hot swap, no failed request")
        rollout("v2", root_1)
        say("7. roll out v3: the first device's health check refuses it; the rollout halts")
        rollout("v3", root_1, expect_halt=True)
        rotate_the_release_key(
            out,
            data=data,
            root_1=root_1,
            broker_url=broker_url,
            serve_port=serve_port,
            rollout=rollout,
        )

        def build(model: Path, version: str, sequence: str, name: str, *more: str) -> None:
            run(edgeship, "build", model,
                "--metadata", ROOT / "examples" / "quickstart" / "digits.toml",
                "--key", out / "keys" / "release-2", "--passphrase-env", PASSPHRASE_ENV,
                "--golden-inputs", data / "validation.npz", *more,
                "--version", version, "--sequence", sequence,
                "--out", out / "bundles" / name)  # fmt: skip

        first_port = ports[0]
        models_and_shadow(
            out,
            data=data,
            trust=out / "root-2.json",
            http=(first_port, token),
            run=run,
            say=say,
            rollout=rollout,
            build=build,
        )
        time.sleep(3)  # one more telemetry interval for the report
        for t in traffic:
            t.stop_event.set()
        for t in traffic:
            t.join(timeout=15)
        answered = sum(t.ok for t in traffic)
        failed = [f for t in traffic for f in t.failed]
        early = sum(t.no_model for t in traffic)
        print(
            f"traffic: {answered} predictions answered, {len(failed)} failed; {early} sent"
            " before v1 was installed were answered 503 (the devices count them as errors)"
        )
        if failed:
            print("\n".join(failed[:10]))
            raise SystemExit("requests failed during the rollouts")

        say("13. fleet status, Prometheus metrics and the HTML report")
        run(edgeship, "fleet", "status", "--db", out / "fleet.sqlite")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            lines = response.read().decode().splitlines()
        print(f"$ curl {metrics_url} | grep -E 'device_(online|latency_seconds)'")
        print("\n".join(x for x in lines if re.match(r"edgeship_device_(online|latency_s)", x)))
        run(edgeship, "fleet", "report", "--db", out / "fleet.sqlite", "--out", out / "report.html")
    say(
        f"done: open {out / 'report.html'}; everything the demo made is in {out}/\n"
        f"    Prometheus: `edgeship fleet metrics --db {out / 'fleet.sqlite'} --metrics-port"
        " 9470` serves the fleet at http://127.0.0.1:9470/metrics (rules and a scrape config:"
        " examples/prometheus/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
