"""A real S3-compatible server (moto's server mode) on loopback, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MOTO_SERVER = Path(sys.executable).parent / "moto_server"


@dataclass
class S3Server:
    """A moto_server subprocess; `kill()` it to simulate the store dying mid-transfer."""

    port: int
    process: subprocess.Popen
    access_key: str = "testing"
    secret_key: str = "testing-secret"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides: str) -> dict[str, str]:
        """Credentials and region for boto3's standard chain, isolated from any ~/.aws config."""
        env = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
        return {**env, **overrides}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_s3_server(port: int, *, auth: bool = False, log: Path | None = None) -> S3Server:
    """Start moto_server on 127.0.0.1:port. With auth, credentials are checked like AWS does:
    the first three requests create an IAM user with an access key, every later one must sign with it."""
    env = dict(os.environ)
    env.pop("AWS_ENDPOINT_URL", None)
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(port, proc)
    deadline = time.monotonic() + 30
    while True:  # a TCP connect, not a request: requests count toward INITIAL_NO_AUTH_ACTION_COUNT
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start listening within 30 s")
            time.sleep(0.1)
    if auth:
        import boto3

        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="ci")
        iam.put_user_policy(UserName="ci", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
    return server
