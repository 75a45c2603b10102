"""The container image and the CloudFormation template: hadolint and cfn-lint pass, and what they tell ECS and the
load balancer matches what loraserve actually does (no Docker engine runs here; everything the image runs is tested
outside it: `loraserve serve`, `loraserve health`)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from loraserve.cli import SERVE_CONFIGS
from loraserve.config import ServerConfig, env_name
from loraserve.v1 import inference_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV_NAMES = {env_name(f) for cls in SERVE_CONFIGS for f in fields(cls)}
SECRET_ENV = {"LORASERVE_AUTH_TOKENS", "LORASERVE_ADMIN_TOKENS"}


class CloudFormationLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) read as plain values."""


def _tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    return {suffix: loader.construct_mapping(node, deep=True)}


CloudFormationLoader.add_multi_constructor("!", _tag)


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load((ROOT / "deploy" / "loraserve.yaml").read_text(), Loader=CloudFormationLoader)


def resources(template: dict, kind: str) -> dict[str, dict]:
    return {name: r["Properties"] for name, r in template["Resources"].items() if r["Type"] == kind}


def test_hadolint_passes() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_passes() -> None:
    result = subprocess.run(
        [str(BIN / "cfn-lint"), "deploy/loraserve.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_serve_checks_health_and_is_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["loraserve", "serve"]' in dockerfile
    assert re.search(r'HEALTHCHECK .*\n\s*CMD \["loraserve", "health"', dockerfile)
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)[-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert re.search(r"^EXPOSE 50051 9464$", dockerfile, re.MULTILINE)
    assert (ServerConfig().port, ServerConfig().metrics_port) == (50051, 9464)
    assert re.search(r'^VOLUME \["/var/cache/loraserve", "/var/lib/loraserve"\]', dockerfile, re.MULTILINE)
    assert set(re.findall(r"\b(LORASERVE_[A-Z_]+)=", dockerfile)) <= ENV_NAMES
    assert "ARG VARIANT=cpu" in dockerfile and "cu128" in dockerfile


def test_the_target_group_speaks_grpc_and_checks_ready(template: dict) -> None:
    group = next(iter(resources(template, "AWS::ElasticLoadBalancingV2::TargetGroup").values()))
    assert group["ProtocolVersion"] == "GRPC" and group["Matcher"] == {"GrpcCode": "0"}
    service, method = group["HealthCheckPath"].strip("/").split("/")
    assert pb.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods_by_name[method]
    listener = next(iter(resources(template, "AWS::ElasticLoadBalancingV2::Listener").values()))
    assert listener["Protocol"] == "HTTPS" and listener["Port"] == 443


def test_scaling_and_alarms_follow_the_design(template: dict) -> None:
    policies = resources(template, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    tracking = {
        p["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]["PredefinedMetricType"]: p[
            "TargetTrackingScalingPolicyConfiguration"
        ]["TargetValue"]
        for p in policies
    }
    assert tracking["ECSServiceAverageCPUUtilization"] == 70
    assert tracking["ECSServiceAverageMemoryUtilization"] == 80
    assert "ALBRequestCountPerTarget" in tracking
    alarms = resources(template, "AWS::CloudWatch::Alarm")
    thresholds = {name: a["Threshold"] for name, a in alarms.items()}
    assert thresholds == {
        "HighCpuAlarm": 80,
        "HighMemoryAlarm": 85,
        "ErrorRateAlarm": 5,
        "SlowResponseAlarm": 10,
        "UnhealthyHostsAlarm": 0,
    }
    assert all(a["AlarmActions"] for a in alarms.values())


def test_the_bucket_is_private_encrypted_versioned_and_the_task_reads_only_its_prefixes(template: dict) -> None:
    bucket = next(iter(resources(template, "AWS::S3::Bucket").values()))
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    encryption = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert encryption["SSEAlgorithm"] == "AES256"
    task_role = template["Resources"]["TaskRole"]["Properties"]
    statements = [s for policy in task_role["Policies"] for s in policy["PolicyDocument"]["Statement"]]
    assert {s["Action"] for s in statements} == {"s3:GetObject", "s3:ListBucket"}
    objects = next(s for s in statements if s["Action"] == "s3:GetObject")["Resource"]
    assert all(r["Sub"].endswith("/*") and "${ModelBucket.Arn}/${" in r["Sub"] for r in objects)


def test_the_task_is_configured_through_real_loraserve_variables(template: dict) -> None:
    container = template["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    names = {e["Name"] for e in container["Environment"]} | {s["Name"] for s in container["Secrets"]}
    assert {n for n in names if n.startswith("LORASERVE_")} <= ENV_NAMES | SECRET_ENV
    assert {s["Name"] for s in container["Secrets"]} == SECRET_ENV  # tokens only from the environment, via secrets
    assert container["HealthCheck"]["Command"][:3] == ["CMD", "loraserve", "health"]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert container["StopTimeout"] > 30


def test_the_container_listens_on_every_interface(template: dict) -> None:
    """loraserve binds loopback unless told otherwise; the image tells it to listen on every interface, so that
    published ports and the load balancer reach it, and the task does not contradict it."""
    assert ServerConfig().host == "127.0.0.1"
    runtime_env = re.findall(r"^ENV ((?:.*\\\n)*.*)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[-1]
    assert re.search(r"\bLORASERVE_HOST=0\.0\.0\.0\b", runtime_env), runtime_env
    container = template["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert all(e["Value"] == "0.0.0.0" for e in container["Environment"] if e["Name"] == "LORASERVE_HOST")
