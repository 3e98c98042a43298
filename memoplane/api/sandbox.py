"""Sandbox: a live sandbox of the agent API (`memoplane serve` on Kubernetes), as an object an
operator can list (`kubectl get sandboxes.memoplane.io`).

The kind's name is kubernetes-sigs/agent-sandbox's, its group is memoplane.io: their group
(agents.x-k8s.io) is served by their controller, which would act on our objects (start pods for
them) and fight us over their status. Their other kinds do not fit: a template here is a runtime
profile (no pod template), the warm pool is each agent's (no SandboxWarmPool to size), and a
sandbox is claimed through the API (E2B's create), not by a SandboxClaim.

The object is a view, written by the API only (its RBAC; users get read access): created once a
sandbox runs, its status kept to the sandbox's (the timeout moves `expires`), deleted when it ends;
deleting it ends the sandbox.
It has no spec: a sandbox is created through the API, so a field here would be one nothing acts on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from .common import (
    AGE_COLUMN,
    API_VERSION,
    Conditions,
    K8sModel,
    KindInfo,
    ObjectMetaLite,
    PrinterColumn,
    StatusModel,
)


class SandboxSpec(K8sModel):
    """Empty: the sandbox was created through the API (E2B's POST /sandboxes), which writes this object."""


class SandboxStatus(StatusModel):
    """Written by the agent API."""

    node: str | None = Field(default=None, max_length=253, description="The node whose agent runs it.")
    team: str | None = Field(default=None, max_length=253, description="The team of the API key that created it.")
    template: str | None = Field(default=None, max_length=253,
                                 description="The template it was created from (a runtime profile).")
    created: str | None = Field(default=None, description="When it started (RFC 3339).")
    expires: str | None = Field(default=None, description="When its timeout ends it (RFC 3339); moves with "
                                "the API's set_timeout.")
    conditions: Conditions = Field(default_factory=list, description="Ready=True while it runs (the object "
                                   "is deleted when it ends).")
    observed_generation: int | None = Field(default=None, ge=0)


class Sandbox(K8sModel):
    model_config = ConfigDict(extra="ignore")

    api_version: Literal["memoplane.io/v1alpha1"] = API_VERSION
    kind: Literal["Sandbox"] = "Sandbox"
    metadata: ObjectMetaLite
    spec: SandboxSpec = Field(default_factory=SandboxSpec)
    status: SandboxStatus = Field(default_factory=SandboxStatus)


SANDBOX = KindInfo(
    kind="Sandbox",
    plural="sandboxes",
    short_names=("mpsbx",),
    spec_model=SandboxSpec,
    status_model=SandboxStatus,
    description="A live sandbox of the memoplane agent API (written by the API; deleted when the sandbox ends).",
    columns=(
        PrinterColumn("Node", ".status.node", "string"),
        PrinterColumn("Team", ".status.team", "string"),
        PrinterColumn("Template", ".status.template", "string"),
        PrinterColumn("Expires", ".status.expires", "string"),
        AGE_COLUMN,
    ),
)
