"""The structural reader: a plain document in, ``Dag`` records and ``Problem``s out.

The grammar of a DAG file (top level, slots, env, jobs, inputs, ``where``, outputs, triggers,
publish) over ``ValueReader``'s checks of plain values (``trace_core.dag._values``).
"""

from __future__ import annotations

from typing import Any

from trace_core import errors, secret_names
from trace_core.cron import cron_problem
from trace_core.dag._records import (
    COLUMN_RE,
    COLUMN_TYPES,
    DAG_KEYS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    ENV_RE,
    INPUT_KEYS,
    JOB_KEYS,
    MAX_ATTEMPTS_LIMIT,
    MAX_CONCURRENCY_LIMIT,
    MAX_IN_VALUES,
    MAX_JOBS,
    MAX_SLOTS,
    MAX_TIMEOUT_S,
    OUTPUT_KEYS,
    PUBLISH_KEYS,
    RESERVED_ENV_PREFIX,
    SCALING_KEYS,
    SLOT_KEYS,
    TRIGGER_KEYS,
    WHERE_OPERATORS,
    Condition,
    Dag,
    DatasetRef,
    Input,
    Job,
    JobRef,
    Output,
    Publish,
    Runtime,
    Scaling,
    Slot,
    Storage,
    Trigger,
    TriggerType,
    UpdateStrategy,
)
from trace_core.dag._values import ValueReader
from trace_core.dag._words import (
    close_hint,
    duration_s,
    is_scalar,
    json_problem,
    kind_of,
    show,
)


class Reader(ValueReader):
    """Turns a plain document into records, collecting problems instead of raising."""

    def dag(self, doc: object) -> Dag | None:
        top = self.mapping(doc, "", "a DAG file")
        if top is None:
            return None
        self.keys(top, "", DAG_KEYS, required=("name", "jobs"))
        name = self.name(top["name"], "name", "DAG name") if "name" in top else None
        description = self.description(top.get("description"), "description")
        pools: dict[str, tuple[Slot, ...]] = {}
        if "worker_pools" in top and (
            m := self.mapping(top["worker_pools"], "worker_pools", "worker_pools")
        ):
            for pool_name, slots in m.items():
                path = f"worker_pools.{pool_name}"
                if (
                    self.name(pool_name, path, "pool name") is not None
                    and (parsed := self.slots(slots, path)) is not None
                ):
                    pools[pool_name] = parsed
                else:
                    self.broken_pools.add(pool_name)
        jobs: dict[str, Job] = {}
        if "jobs" in top and (m := self.mapping(top["jobs"], "jobs", "jobs")) is not None:
            if not m:
                self.problem("jobs", "a DAG needs at least one job")
            if len(m) > MAX_JOBS:
                self.problem("jobs", f"at most {MAX_JOBS} jobs per DAG")
            for job_name, body in m.items():
                path = f"jobs.{job_name}"
                if self.name(job_name, path, "job name") is None:
                    continue
                if (job := self.job(job_name, body, path)) is not None:
                    jobs[job_name] = job
                else:
                    self.broken_jobs.add(job_name)
        publish: list[Publish] = []
        if (
            "publish" in top
            and (items := self.array(top["publish"], "publish", "publish")) is not None
        ):
            for i, item in enumerate(items):
                if (p := self.publish(item, f"publish[{i}]")) is not None:
                    publish.append(p)
        # A DAG without a valid name still gets the graph rules (its problems are reported).
        return Dag(
            name=name or "",
            jobs=jobs,
            publish=tuple(publish),
            worker_pools=pools,
            description=description,
        )

    def description(self, value: object, path: str) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        self.problem(path, f"must be a string, not {kind_of(value)}")
        return ""

    def slots(self, value: object, path: str) -> tuple[Slot, ...] | None:
        items = self.array(value, path, "a worker pool (its slots)")
        if items is None:
            return None
        if not items:
            self.problem(path, "a worker pool needs at least one slot")
            return None
        if len(items) > MAX_SLOTS:
            self.problem(path, f"at most {MAX_SLOTS} slots per pool")
            return None
        out = []
        for i, item in enumerate(items):
            spath = f"{path}[{i}]"
            m = self.mapping(item, spath, "a slot")
            if m is None:
                continue
            self.keys(m, spath, SLOT_KEYS)
            env = self.env(m.get("env", {}), f"{spath}.env", secret=False)
            secret_env = self.env(m.get("secret_env", {}), f"{spath}.secret_env", secret=True)
            for k in sorted(env.keys() & secret_env.keys()):
                self.problem(f"{spath}.secret_env.{k}", f"{k} is set in both env and secret_env")
            out.append(Slot(env=env, secret_env=secret_env))
        return tuple(out)

    def env(self, value: object, path: str, *, secret: bool) -> dict[str, str]:
        m = self.mapping(value, path, "secret_env" if secret else "env")
        out: dict[str, str] = {}
        for k, v in (m or {}).items():
            vpath = f"{path}.{k}"
            if not ENV_RE.match(k):
                self.problem(vpath, f"{show(k)} is not an environment variable name")
                continue
            if k.startswith(RESERVED_ENV_PREFIX):
                self.problem(
                    vpath,
                    f"{show(k)}: names starting with {RESERVED_ENV_PREFIX} are the platform's",
                )
                continue
            if not isinstance(v, str):
                self.problem(vpath, f"must be a string, not {kind_of(v)}", "quote it")
                continue
            if secret:
                if v.startswith("trace/"):
                    self.problem(
                        vpath,
                        f"secret {show(v)} must be named relative to the org's namespace",
                        "write 'rpc/key-1' for trace/org/{org_id}/rpc/key-1",
                    )
                    continue
                try:
                    secret_names.org_secret("org", v)
                except errors.ValidationFailed as exc:
                    self.problem(vpath, f"secret name {show(v)}: {exc.message}")
                    continue
            out[k] = v
        return out

    def job(self, name: str, body: object, path: str) -> Job | None:
        m = self.mapping(body, path, "a job")
        if m is None:
            return None
        self.keys(m, path, JOB_KEYS, required=("operator",))
        ok = True
        operator = self.string(m["operator"], f"{path}.operator") if "operator" in m else None
        runtime = Runtime.WORKER
        if "runtime" in m:
            runtime = self.choice(m["runtime"], f"{path}.runtime", Runtime) or Runtime.WORKER
        if "execution_strategy" in m:
            value = m["execution_strategy"]
            if isinstance(value, str) and value.lower() == "bulk":
                self.problem(
                    f"{path}.execution_strategy",
                    "execution_strategy: Bulk is not supported: one event runs one task",
                    "batch explicitly: put a range_aggregator job before this one "
                    "(and a range_splitter to split ranges back)",
                )
            elif value != "per_event":
                self.problem(
                    f"{path}.execution_strategy",
                    f"must be per_event (the only strategy), not {show(value)}",
                    "remove the key",
                )
        config: dict[str, Any] = {}
        if (
            "config" in m
            and (c := self.mapping(m["config"], f"{path}.config", "config")) is not None
        ):
            if (found := json_problem(c, f"{path}.config")) is not None:
                self.problem(found[0], found[1])
                ok = False
            config = dict(c)
        inputs: list[Input] = []
        if (
            "inputs" in m
            and (items := self.array(m["inputs"], f"{path}.inputs", "inputs")) is not None
        ):
            for i, item in enumerate(items):
                if (inp := self.input(item, f"{path}.inputs[{i}]")) is not None:
                    inputs.append(inp)
                else:
                    ok = False
        outputs: list[Output] = []
        if (
            "outputs" in m
            and (items := self.array(m["outputs"], f"{path}.outputs", "outputs")) is not None
        ):
            for i, item in enumerate(items):
                if (out := self.output(item, f"{path}.outputs[{i}]")) is not None:
                    outputs.append(out)
                else:
                    ok = False
        pool = None
        if "worker_pool" in m:
            pool = self.name(m["worker_pool"], f"{path}.worker_pool", "pool name")
            if pool is not None and runtime is Runtime.LAMBDA:
                self.problem(
                    f"{path}.worker_pool",
                    "worker pools are worker slots: a lambda job cannot use one",
                    "use runtime: worker, or remove worker_pool",
                )
        scaling = Scaling()
        if (
            "scaling" in m
            and (s := self.mapping(m["scaling"], f"{path}.scaling", "scaling")) is not None
        ):
            self.keys(s, f"{path}.scaling", SCALING_KEYS)
            if "max_concurrency" in s:
                scaling = Scaling(
                    self.integer(
                        s["max_concurrency"],
                        f"{path}.scaling.max_concurrency",
                        1,
                        MAX_CONCURRENCY_LIMIT,
                    )
                )
            # scaling.mode is accepted and ignored (v1 scales by max_concurrency only).
        timeout = DEFAULT_TIMEOUT_S
        if "timeout" in m:
            seconds = duration_s(m["timeout"])
            if seconds is None:
                self.problem(
                    f"{path}.timeout",
                    f"{show(m['timeout'])} is not a duration",
                    "seconds as an integer, or '90s', '15m'",
                )
            elif not 1 <= seconds <= MAX_TIMEOUT_S:
                self.problem(
                    f"{path}.timeout",
                    f"timeout {seconds} s is outside 1..{MAX_TIMEOUT_S} s",
                    "split long work into smaller ranges (range_splitter)",
                )
            else:
                timeout = seconds
        max_attempts = DEFAULT_MAX_ATTEMPTS
        if "max_attempts" in m:
            max_attempts = (
                self.integer(m["max_attempts"], f"{path}.max_attempts", 1, MAX_ATTEMPTS_LIMIT)
                or DEFAULT_MAX_ATTEMPTS
            )
        triggers: list[Trigger] = []
        if (
            "triggers" in m
            and (items := self.array(m["triggers"], f"{path}.triggers", "triggers")) is not None
        ):
            for i, item in enumerate(items):
                if (t := self.trigger(item, f"{path}.triggers[{i}]")) is not None:
                    triggers.append(t)
        if operator is None or not ok:
            return None
        return Job(
            name=name,
            operator=operator,
            runtime=runtime,
            config=config,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            worker_pool=pool,
            scaling=scaling,
            timeout_s=timeout,
            max_attempts=max_attempts,
            triggers=tuple(triggers),
            description=self.description(m.get("description"), f"{path}.description"),
        )

    def input(self, value: object, path: str) -> Input | None:
        m = self.mapping(value, path, "an input")
        if m is None:
            return None
        self.keys(m, path, INPUT_KEYS, required=("from",))
        source: JobRef | DatasetRef | None = None
        if "from" in m and (f := self.mapping(m["from"], f"{path}.from", "from")) is not None:
            fpath = f"{path}.from"
            if "dataset" in f and "job" in f:
                self.problem(fpath, "from names a job output or a dataset, not both")
            elif "dataset" in f:
                self.keys(f, fpath, frozenset({"dataset"}))
                if (ds := self.name(f["dataset"], f"{fpath}.dataset", "dataset name")) is not None:
                    source = DatasetRef(ds)
            elif "job" in f:
                self.keys(f, fpath, frozenset({"job", "output"}))
                job = self.name(f["job"], f"{fpath}.job", "job name")
                output = 0
                if "output" in f:
                    output = self.integer(f["output"], f"{fpath}.output", 0, 999) or 0
                if job is not None:
                    source = JobRef(job, output)
            else:
                self.problem(
                    fpath,
                    "from needs {job, output} or {dataset}",
                    "e.g. from: {job: ingest, output: 0}",
                )
        where: tuple[Condition, ...] = ()
        if "where" in m:
            where = self.where(m["where"], f"{path}.where")
        if source is None:
            return None
        return Input(source=source, where=where)

    def where(self, value: object, path: str) -> tuple[Condition, ...]:
        if isinstance(value, str):
            self.problem(
                path,
                "where is a structured map, not SQL text",
                "write {field: {op: value}}, e.g. where: {block_number: {gte: 100}}",
            )
            return ()
        m = self.mapping(value, path, "where")
        out: list[Condition] = []
        for field, ops in (m or {}).items():
            fpath = f"{path}.{field}"
            if not COLUMN_RE.match(field):
                self.problem(fpath, f"{show(field)} is not a column name")
                continue
            om = self.mapping(ops, fpath, "a where condition ({op: value})")
            if om is None:
                continue
            if not om:
                self.problem(fpath, "a condition needs an operator", "e.g. {eq: 1}")
            for op, operand in om.items():
                opath = f"{fpath}.{op}"
                if op not in WHERE_OPERATORS:
                    self.problem(
                        opath,
                        f"unknown where operator {show(op)}",
                        close_hint(op, WHERE_OPERATORS)
                        or f"allowed: {', '.join(sorted(WHERE_OPERATORS))}",
                    )
                    continue
                if (cond := self.condition(field, op, operand, opath)) is not None:
                    out.append(cond)
        # ANDed, so order means nothing: sorted, so reordering a map is no change.
        return tuple(sorted(out, key=lambda c: (c.field, c.op)))

    def condition(self, field: str, op: str, operand: object, path: str) -> Condition | None:
        if op == "is_null":
            if not isinstance(operand, bool):
                self.problem(path, "is_null takes true or false")
                return None
            return Condition(field, op, operand)
        if op in ("in", "not_in"):
            if not isinstance(operand, list) or not operand:
                self.problem(path, f"{op} takes a non-empty list of values")
                return None
            if len(operand) > MAX_IN_VALUES:
                self.problem(path, f"{op} takes at most {MAX_IN_VALUES} values")
                return None
            if any(not is_scalar(v) for v in operand):
                self.problem(path, f"{op} values must be strings, numbers or booleans")
                return None
            return Condition(field, op, tuple(operand))
        if not is_scalar(operand):
            self.problem(
                path,
                f"{op} takes a string, number or boolean, not {kind_of(operand)}",
                "test for null with {is_null: true}" if operand is None else "",
            )
            return None
        return Condition(field, op, operand)

    def output(self, value: object, path: str) -> Output | None:
        m = self.mapping(value, path, "an output")
        if m is None:
            return None
        self.keys(m, path, OUTPUT_KEYS, required=("storage", "update_strategy"))
        storage = self.choice(m["storage"], f"{path}.storage", Storage) if "storage" in m else None
        strategy = (
            self.choice(m["update_strategy"], f"{path}.update_strategy", UpdateStrategy)
            if "update_strategy" in m
            else None
        )
        schema: dict[str, str] = {}
        if (
            "schema" in m
            and (s := self.mapping(m["schema"], f"{path}.schema", "schema")) is not None
        ):
            for col, typ in s.items():
                cpath = f"{path}.schema.{col}"
                if not COLUMN_RE.match(col):
                    self.problem(cpath, f"{show(col)} is not a column name", "lower snake_case")
                elif typ not in COLUMN_TYPES:
                    self.problem(
                        cpath,
                        f"unknown column type {show(typ)}",
                        close_hint(str(typ), COLUMN_TYPES)
                        or f"types: {', '.join(sorted(COLUMN_TYPES))}",
                    )
                else:
                    schema[col] = typ
        unique_key: list[str] = []
        if "unique_key" in m:
            raw = m["unique_key"]
            items = (
                [raw]
                if isinstance(raw, str)
                else self.array(raw, f"{path}.unique_key", "unique_key")
            )
            for i, col in enumerate(items or []):
                kpath = (
                    f"{path}.unique_key[{i}]" if not isinstance(raw, str) else f"{path}.unique_key"
                )
                if not isinstance(col, str) or not COLUMN_RE.match(col):
                    self.problem(kpath, f"{show(col)} is not a column name")
                elif "schema" in m and col not in schema:
                    self.problem(kpath, f"unique_key column {show(col)} is not in the schema")
                else:
                    unique_key.append(col)
            if unique_key and "schema" not in m:
                self.problem(
                    f"{path}.unique_key", "unique_key needs a schema", "declare the output's schema"
                )
        buffered = self.boolean(m["buffered"], f"{path}.buffered") if "buffered" in m else False
        multi = (
            self.boolean(m["multi_writer"], f"{path}.multi_writer")
            if "multi_writer" in m
            else False
        )
        if storage is Storage.POSTGRES_TABLE and not m.get("schema"):
            self.problem(f"{path}.schema", "a postgres_table output needs a schema")
        if (
            storage is Storage.POSTGRES_TABLE
            and strategy is UpdateStrategy.APPEND
            and not m.get("unique_key")
        ):
            self.problem(
                f"{path}.unique_key",
                "an append postgres_table output needs a unique_key",
                "append dedupes rows by unique_key",
            )
        if buffered and storage is Storage.OBJECT_STORE:
            self.problem(f"{path}.buffered", "only a postgres_table output can be buffered")
        if multi and not (buffered and strategy is UpdateStrategy.APPEND):
            self.problem(
                f"{path}.multi_writer",
                "only a buffered append output can be multi-writer",
                "set buffered: true and update_strategy: append",
            )
        if storage is None or strategy is None:
            return None
        return Output(
            storage=storage,
            update_strategy=strategy,
            unique_key=tuple(unique_key),
            schema=schema,
            buffered=buffered,
            multi_writer=multi,
        )

    def trigger(self, value: object, path: str) -> Trigger | None:
        m = self.mapping(value, path, "a trigger")
        if m is None:
            return None
        if "type" not in m:
            self.problem(f"{path}.type", "'type' is required", "manual, cron or interval")
            return None
        kind = self.choice(m["type"], f"{path}.type", TriggerType)
        if kind is None:
            return None
        self.keys(m, path, TRIGGER_KEYS[kind], required=TRIGGER_KEYS[kind] - {"type"})
        match kind:
            case TriggerType.MANUAL:
                return Trigger(kind)
            case TriggerType.CRON:
                if (
                    "schedule" not in m
                    or (text := self.string(m["schedule"], f"{path}.schedule")) is None
                ):
                    return None
                if (why := cron_problem(text)) is not None:
                    self.problem(f"{path}.schedule", why, "e.g. '*/5 * * * *' (every 5 minutes)")
                    return None
                return Trigger(kind, schedule=text)
            case TriggerType.INTERVAL:
                if "every" not in m:
                    return None
                seconds = duration_s(m["every"])
                if seconds is None or seconds < 1:
                    self.problem(
                        f"{path}.every",
                        f"{show(m['every'])} is not a positive duration",
                        "seconds as an integer, or '30s', '5m', '1h'",
                    )
                    return None
                return Trigger(kind, every_s=seconds)
        return None  # pragma: no cover - every TriggerType is matched above

    def publish(self, value: object, path: str) -> Publish | None:
        m = self.mapping(value, path, "a publish entry")
        if m is None:
            return None
        self.keys(m, path, PUBLISH_KEYS, required=("job", "dataset"))
        job = self.name(m["job"], f"{path}.job", "job name") if "job" in m else None
        output = self.integer(m["output"], f"{path}.output", 0, 999) if "output" in m else 0
        dataset = (
            self.name(m["dataset"], f"{path}.dataset", "dataset name") if "dataset" in m else None
        )
        if job is None or output is None or dataset is None:
            return None
        return Publish(job=job, output=output, dataset=dataset)
