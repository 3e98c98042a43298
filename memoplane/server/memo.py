"""POST /v1/run: memoized runs with the key of a ComputeJob and `memoplane run`.

The same path as `memoplane run` (memoplane.embedded.run_job, the keyring's trust and signer,
the report's JSON): an agent's run and a person's identical `memoplane run` share one result.
A miss runs in the server's warm pool for the job's runtime profile; on Kubernetes the caller's
namespace's ResultCache is the memory and a miss is a ComputeJob there (cluster_runs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ..cas import open_store
from ..commands.run import report_json
from ..embedded import Shared, run_job
from ..errors import InputError, JobFailed
from ..inputs import check_input_name, env_problem
from ..jobs import CommandCode, Input, Job, JsonInput, Policy, PythonCode
from ..keys import code_digest
from ..sandbox.types import Limits
from ..trust.local import Keyring
from .auth import Caller, Who
from .cluster_runs import ClusterRuns
from .errors import ApiError
from .sessions import SessionManager
from .stores import open_team_store


class RunRequest(BaseModel):
    """A Python function (code + entrypoint) or a command, called with JSON inputs."""

    model_config = ConfigDict(extra="forbid")
    code: str | None = Field(None, description="Python source defining the entrypoint")
    entrypoint: str = "main"
    command: list[str] | None = Field(None, description="argv of a command (instead of code)")
    inputs: dict[str, Any] = Field(default_factory=dict, description="name -> JSON value, keyword arguments")
    env: dict[str, str] = Field(default_factory=dict)
    salt: str = Field("", description="a cache version: change it to force a new result")
    policy: Policy = Field("Use", description="Use the cache, Refresh (recompute and replace) or Bypass it")
    timeout: float = Field(600.0, gt=0, description="wall-clock limit of a computation, seconds")
    namespace: str | None = Field(None, description="on Kubernetes: the namespace (one of the API key's) whose "
                                  "ResultCache serves the run and where a miss runs as a ComputeJob")

    def job(self) -> tuple[Job, str]:
        """The job and its identity (what `explain` compares against), as `memoplane run` builds them."""
        if (self.code is None) == (self.command is None):
            raise ApiError(400, "give exactly one of code and command", 'send {"code": "def main(): ..."} '
                           'or {"command": ["echo", "hi"]}')
        for name, value in self.env.items():
            problem = env_problem(name, value)
            if problem:
                raise ApiError(400, f"env {problem[0]}", problem[1])
        inputs: dict[str, Input] = {}
        for name, value in self.inputs.items():
            try:
                inputs[check_input_name(name, "inputs")] = JsonInput(value)
            except InputError as e:
                raise ApiError(400, str(e)) from None
        limits = Limits(timeout_s=self.timeout)
        if self.command is not None:
            if not self.command:
                raise ApiError(400, "command is empty", 'give argv, e.g. ["echo", "hi"]')
            code: PythonCode | CommandCode = CommandCode(tuple(self.command))
            identity = "command:" + self.command[0]
        else:
            code = PythonCode(source=str(self.code), entrypoint=self.entrypoint, filename="<api>")
            identity = f"api:{code_digest(str(self.code))}:{self.entrypoint}"
        return Job(code=code, inputs=inputs, env=self.env, salt=self.salt, limits=limits), identity


def routes(api: FastAPI, sessions: SessionManager, store: str | None) -> ClusterRuns | None:
    """/v1/run's route; on Kubernetes its ClusterRuns, which the server closes at shutdown (it keeps stores open)."""
    cluster = ClusterRuns(sessions.placement) if sessions.placement is not None else None

    @api.post("/v1/run", tags=["memory"])
    async def run(body: RunRequest, who: Who) -> dict[str, Any]:
        """Run once; an identical later call of the same team (here, or `memoplane run` for the
        local team) answers `cached: true` with the seconds of compute the stored result saved.
        On Kubernetes: of the same namespace, or a ComputeJob of the same key there."""
        job, identity = body.job()
        if cluster is not None:
            return await cluster.run(job, body.policy, who, body.namespace)
        if body.namespace is not None:
            raise ApiError(400, "namespace is for /v1/run on Kubernetes (MEMOPLANE_SERVE_NAMESPACE set): this "
                           "server computes in its own pools", "leave namespace out")
        return await asyncio.to_thread(_run, job, identity, body.policy, sessions, store, who)

    return cluster


def _run(job: Job, identity: str, policy: Policy, sessions: SessionManager, store: str | None,
         who: Caller) -> dict[str, Any]:
    keyring = Keyring()
    with open_team_store(store, who.team) as opened, contextlib.ExitStack() as granted:
        # The teams that granted the caller's team their results, as the keys file says now; a hit
        # there is judged by the same trust policy and recorded in the server's audit log.
        shared = Shared({t: granted.enter_context(open_team_store(store, t)) for t in who.reads_from}, who.team,
                        granted.enter_context(open_store(store))) if who.reads_from else None
        try:
            report = run_job(job, opened, lambda: sessions.pool(job.profile), policy=policy, identity=identity,
                             trust=keyring.policy(), signer=keyring.signer(), shared=shared)
        except JobFailed as failed:
            raise ApiError(422, str(failed)) from None
        source = shared.stores[report.shared_by] if shared is not None and report.shared_by else opened
        return {**report_json(report, source), "shared_by": report.shared_by or None}
