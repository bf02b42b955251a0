"""The scripted fault scenarios. Each runs in a fresh `ChaosEnv` and returns a `ScenarioResult`.

A scenario passes when (1) the stream and the signals table hold exactly the expected signals (see
`env.compare`) and (2) every check on what readiness and metrics reported during the fault holds. `quick`
(CI) keeps every fault but shortens holds and repetitions; the numbers used are in each result's notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nats

from hl_monitor.chaos.env import DELIVERY_STALL_S, STALE_AFTER_S, STREAM, ChaosEnv, ChaosOptions, Observation, Verdict
from hl_monitor.errors import ChaosError
from hl_monitor.sim.server import SimConfig

__all__ = ["SCENARIOS", "Check", "Scenario", "ScenarioResult", "run_scenario"]

WARM_S: Final = 1.0  # trading before a fault, so orders are open when it hits
READY_WITHIN_S: Final = 30.0
REFUSE_S: Final = 1.0  # after an abrupt close the exchange refuses reconnects this long
STALL_CHANNELS: Final = ("userFills", "orderUpdates", "allDexsClearinghouseState", "spotState")
# A stale verdict takes `stale_after` (the chaos env's short one) plus a reconnect: seen well within this.
STALL_FOUND_WITHIN_S: Final = 15.0
# Fill-audit interval for `silent_fills`: with the audit's 5 s lag the lost fills are found within ~10 s.
AUDIT_INTERVAL_S: Final = 2.0
AUDIT_FOUND_WITHIN_S: Final = 30.0
# The kill -9 scenario restarts the service every second or so; each start opens one connection per whale.
# The real per-IP limit (30/min) would make that test a minute per 15 restarts, so the sim's limit is raised
# there (the reconnect storm scenario is the one that holds the service to the real limit).
KILL_SIM_NEW_CONNECTIONS: Final = 100_000
KILL_SIM_REST_WEIGHT: Final = 1_000_000  # CI: recovery after each restart is not held up by 429s
REST_WINDOW_SETTLE_S: Final = 90.0  # full run: settling may wait out the exchange's one-minute REST window
KILL_DURING_STARTUP_EVERY: Final = 4  # every 4th kill lands during start-up, the rest while the service works
KILL_STARTUP_RANGE_S: Final = (0.3, 2.0)  # seconds after exec: imports, DB/NATS connect, state restore, subscribe
KILL_RUNNING_RANGE_S: Final = (0.0, 0.6)  # seconds after the HTTP port answered: recovery, live trading, flushes
SKEW_S: Final = 3 * 3600.0  # exchange clock vs local clock in the skew scenario (both directions)
DISK_FULL_TMPFS: Final = "8m"  # tmpfs size for the "store full" phase (below the embedded store's minimum)
STORM_SIM_LIMIT: Final = 30  # the documented per-IP new-connection limit


@dataclass(slots=True)
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class ScenarioResult:
    name: str
    title: str
    verdict: Verdict | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    log_path: Path | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.verdict is not None and self.verdict.ok and all(c.ok for c in self.checks)

    def problems(self) -> list[str]:
        out = [f"error: {self.error}"] if self.error else []
        if self.verdict is not None:
            out += self.verdict.problems
        out += [f"check failed: {c.what} ({c.detail})" for c in self.checks if not c.ok]
        return out


Run = Callable[[ChaosOptions, Path, ScenarioResult], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    run: Run
    needs_mariadb: bool = False


def _reconnect_reasons(obs: Observation) -> str:
    last = next((s for s in reversed(obs.samples) if s.metrics), None)
    first = next((s for s in obs.samples if s.metrics), None)
    if last is None or first is None or last.metrics is None:
        return ""
    out = []
    for (name, labels), value in sorted(last.metrics.items(), key=lambda kv: sorted(kv[0][1])):
        if name == "hl_monitor_reconnects_total":
            before = first.metrics.get((name, labels), 0.0) if first.metrics else 0.0
            if value > before:
                out.append(f"{dict(labels).get('kind')}/{dict(labels).get('reason')}+{value - before:g}")
    return ", ".join(out)


# --------------------------------------------------------------------------------------- scenarios


async def _stall_first_whale(
    env: ChaosEnv, channels: Sequence[str], until: Callable[[Observation], bool], within: float
) -> Observation:
    """Start the service and trade; withhold `channels` of the first whale (socket open) until `until` holds."""
    await env.start_service()
    async with env.trading():
        await asyncio.sleep(WARM_S)
        async with env.observe() as obs:
            for channel in channels:
                env.sim.faults.stall(channel, user=env.whales[0])
            await env.wait_observed(obs, until, within)
            await env.svc.wait_ready(READY_WITHIN_S)
    return obs


async def silent_stall(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    async with ChaosEnv(opts, workdir) as env:
        res.log_path = env.svc.log_path

        def reconnected(o: Observation) -> bool:
            return o.delta("hl_monitor_reconnects_total", kind="user") >= 1

        obs = await _stall_first_whale(env, STALL_CHANNELS, reconnected, STALL_FOUND_WITHIN_S)
        # The stale verdict reconnects at once and the resubscribe heals, so readiness is false only for the
        # reconnect itself (often shorter than a sample); the feed's age is what shows the stall while it lasts.
        age = obs.max("hl_monitor_feed_age_seconds")
        res.checks.append(Check("feed_age_seconds rose past stale_after", age >= STALE_AFTER_S, f"max age {age:.1f} s"))
        stale = obs.delta("hl_monitor_reconnects_total", kind="user", reason="stale_canary")
        stale += obs.delta("hl_monitor_reconnects_total", kind="user", reason="stale_connection")
        res.checks.append(Check("stale reconnect counted", stale >= 1, _reconnect_reasons(obs)))
        res.notes.append(f"readiness while reconnecting: {obs.reason_texts() or 'not sampled (reconnect < 0.2 s)'}")
        res.notes.append(
            f"stalled {', '.join(STALL_CHANNELS)} of one whale with the socket open; {_reconnect_reasons(obs)}"
        )
        res.verdict = await env.finish()


async def silent_fills(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    """Only `userFills` goes quiet: the canary, bbo and orderUpdates keep flowing, so no feed looks stale."""
    extra = {"HL_MONITOR__HYPERLIQUID__FILL_AUDIT_INTERVAL": f"{AUDIT_INTERVAL_S:g}"}
    async with ChaosEnv(opts, workdir, service_env=extra) as env:
        res.log_path = env.svc.log_path
        obs = await _stall_first_whale(
            env,
            ("userFills",),
            lambda o: o.delta("hl_monitor_reconnects_total", kind="user", reason="fills_missed") >= 1,
            AUDIT_FOUND_WITHIN_S,
        )
        missed = obs.delta("hl_monitor_fill_audits_total", outcome="missed")
        recovered = obs.delta("hl_monitor_backfilled_fills_total", via="audit")
        res.checks.append(
            Check(
                "fill audit found the lost fills",
                missed >= 1 and recovered >= 1,
                f"fill_audits missed +{missed:g}, backfilled_fills via audit +{recovered:g}",
            )
        )
        rebuilt = obs.delta("hl_monitor_reconnects_total", kind="user", reason="fills_missed")
        res.checks.append(Check("subscription rebuilt", rebuilt >= 1, _reconnect_reasons(obs)))
        res.notes.append(
            f"stalled userFills only (canary, bbo, orderUpdates flowing), fill audit every {AUDIT_INTERVAL_S:g} s; "
            f"max feed age {obs.max('hl_monitor_feed_age_seconds'):.1f} s; {_reconnect_reasons(obs)}"
        )
        res.verdict = await env.finish()


async def abrupt_close(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    reps = 2 if opts.quick else 8
    # Every rep reconnects both whales: the real 30/min new-connection limit would stretch the full run by minutes
    # (reconnect_storm is the scenario that holds the service to it).
    sim_cfg = SimConfig(
        clearinghouse_push_interval=0.3, seed=opts.seed, max_new_connections_per_minute=KILL_SIM_NEW_CONNECTIONS
    )
    # The service counts refused upgrades against its own new-connection budget too; with the chaos reconnect
    # delays (50 ms) a refusal window would spend the minute's budget, so both limits are raised here.
    extra = {"HL_MONITOR__HYPERLIQUID__MAX_NEW_CONNECTIONS_PER_MINUTE": str(KILL_SIM_NEW_CONNECTIONS)}
    # Each reconnect's recovery reserves REST weight (userFillsByTime pays for a full page up front): eight rounds in
    # a few seconds exhaust the service's own one-minute REST budget, so the last orderStatus calls wait for it.
    settle = DELIVERY_STALL_S if opts.quick else REST_WINDOW_SETTLE_S
    async with ChaosEnv(opts, workdir, sim_config=sim_cfg, service_env=extra, settle_stall_s=settle) as env:
        res.log_path = env.svc.log_path
        whale = env.sim.exchange.whale(env.whales[0])
        limit = env.sim.config.max_connections
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                for _ in range(reps):
                    oid = await whale.limit_order("ETH", True, "3", "2290")
                    await whale.fill(oid, "1")
                    # The exchange drops every socket and refuses new ones for a while (HTTP 429 on upgrade),
                    # so the outage lasts long enough for readiness to have to report it.
                    env.replace_sim_config(max_connections=0)
                    closed = env.sim.faults.abrupt_close_all()
                    await whale.fill(oid, "0.5", px="2289.5")  # lands while the feed is down
                    await env.wait_observed(obs, lambda o: o.saw_reason("feed:"), 10)
                    await asyncio.sleep(REFUSE_S)
                    env.replace_sim_config(max_connections=limit)
                    await whale.cancel(oid)
                    await env.svc.wait_ready(READY_WITHIN_S)
                    await asyncio.sleep(0.5)
        dropped = obs.delta("hl_monitor_reconnects_total", kind="user")
        res.checks.append(Check("reconnects counted", dropped >= reps, _reconnect_reasons(obs)))
        named = obs.saw_reason("feed:")
        res.checks.append(Check("readiness named the feeds while down", named, str(obs.reason_texts())))
        res.notes.append(
            f"{reps}x: every socket ({closed} open) closed without a close frame mid-order, reconnects refused "
            f"for {REFUSE_S:g} s; {_reconnect_reasons(obs)}"
        )
        res.verdict = await env.finish()


async def dropped_ack(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    async with ChaosEnv(opts, workdir) as env:
        res.log_path = env.svc.log_path
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                env.sim.faults.drop_next_ack("userFills")
                env.sim.faults.drop_next_ack("orderUpdates")
                env.sim.faults.abrupt_close_all()  # the resubscribe loses its acks
                await env.wait_observed(obs, lambda o: o.delta("hl_monitor_subscribe_retries_total") >= 1, 10)
                await env.svc.wait_ready(READY_WITHIN_S)
        retries = obs.delta("hl_monitor_subscribe_retries_total")
        res.checks.append(Check("subscribe retries counted", retries >= 1, f"retries +{retries:g}"))
        res.checks.append(Check("readiness named the feed", obs.saw_reason("feed:"), str(obs.reason_texts())))
        res.notes.append(f"dropped {env.sim.stats.acks_dropped} acks; subscribe_retries +{retries:g}")
        res.verdict = await env.finish()


async def reconnect_storm(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    closes = 10 if opts.quick else 20
    sim_cfg = SimConfig(clearinghouse_push_interval=0.3, seed=opts.seed, max_new_connections_per_minute=STORM_SIM_LIMIT)
    # Past the budget the feeds wait for the one-minute window, and recovery then meets REST limits: settle longer.
    async with ChaosEnv(opts, workdir, sim_config=sim_cfg, settle_stall_s=REST_WINDOW_SETTLE_S) as env:
        res.log_path = env.svc.log_path
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                for _ in range(closes):
                    env.sim.faults.abrupt_close_all()
                    await asyncio.sleep(0.25)
                await env.svc.wait_ready(90.0)  # past the limit the service waits for the one-minute window
        reconnects = obs.delta("hl_monitor_reconnects_total", kind="user")
        refused = env.sim.stats.connections_refused
        # A round that lands while a feed waits for its budget closes nothing of it: at least half must count.
        res.checks.append(Check("reconnects counted", reconnects >= closes // 2, _reconnect_reasons(obs)))
        res.checks.append(Check("never refused by the exchange's per-IP limit", refused == 0, f"refused {refused}"))
        waits = obs.delta("hl_monitor_budget_refusals_total")
        res.notes.append(
            f"{closes} close-all rounds 0.25 s apart, {env.sim.stats.connections_opened} connections opened, "
            f"sim limit {STORM_SIM_LIMIT}/min, budget waits +{waits:g}, refused by sim {refused}"
        )
        res.verdict = await env.finish()


async def _wait_stream_recovered(env: ChaosEnv, address: str, within: float) -> None:
    """Until /status shows `address`'s precise stream live with its first gap recovery done."""
    async with asyncio.timeout(within):
        while True:
            _, status = await env.svc.get("/status")
            if isinstance(status, dict):
                streams = (status.get("connections") or {}).get("assigned") or []
                if any(s.get("address") == address and s.get("recoveries", 0) >= 1 for s in streams):
                    return
            await asyncio.sleep(0.1)


async def user_cap(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    sim_cfg = SimConfig(clearinghouse_push_interval=0.3, seed=opts.seed, max_users=1)
    async with ChaosEnv(opts, workdir, sim_config=sim_cfg) as env:
        res.log_path = env.svc.log_path
        first, second = env.whales
        env.trading_whales = (first,)  # the capped whale has no feed yet: its first snapshot only seeds it
        await env.start_service(wait_ready=False)
        await env.svc.wait_http(READY_WITHIN_S)
        # Trade only once the first whale's stream is live and recovered: an order that lands in its seeding
        # snapshot gets no precise signal by design (the tape reports it instead, under a tape id).
        await _wait_stream_recovered(env, first, READY_WITHIN_S)
        async with env.trading():
            async with env.observe() as obs:
                await env.wait_observed(obs, lambda o: o.max("hl_monitor_error_frames_total", kind="user_cap") >= 1, 15)
                _, status = await env.svc.get("/status")
                capped = _address_state(status, second)
                env.replace_sim_config(max_users=10)  # the operator's fix: a bigger allowance
                await _wait_for_state(env, second, "precise", 20)
                await env.svc.wait_ready(READY_WITHIN_S)
            env.trading_whales = None
            await asyncio.sleep(2 * WARM_S)
        errors = obs.max("hl_monitor_error_frames_total", kind="user_cap")
        res.checks.append(Check("user-cap error frames counted", errors >= 1, f"error_frames{{user_cap}}={errors:g}"))
        res.checks.append(
            Check("/status showed the capped whale over budget", capped == "over_budget", f"state {capped}")
        )
        res.notes.append("sim max_users=1, raised to 10 while running; the capped whale gets its slot back")
        res.verdict = await env.finish()


def _address_state(status: object, address: str) -> str | None:
    if not isinstance(status, dict):
        return None
    for entry in status.get("addresses", []):
        if entry.get("address") == address:
            state: str | None = entry.get("state")
            return state
    return None


async def dup_reorder(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    rounds = 3 if opts.quick else 10
    async with ChaosEnv(opts, workdir) as env:
        res.log_path = env.svc.log_path
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                env.sim.faults.status_before_fills(True)
                for _ in range(rounds):
                    env.sim.faults.duplicate_next("userFills", 3)
                    env.sim.faults.duplicate_next("orderUpdates", 3)
                    env.sim.faults.duplicate_next("userEvents", 3)
                    await asyncio.sleep(0.7)
                env.sim.faults.status_before_fills(False)
                await asyncio.sleep(0.5)
        dups = obs.delta("hl_monitor_trades_deduplicated_total")
        res.checks.append(Check("duplicate fills counted", dups >= 1, f"trades_deduplicated +{dups:g}"))
        res.checks.append(Check("readiness stayed 200 (no false alarm)", obs.always_ready(), str(obs.reason_texts())))
        res.notes.append(
            f"{env.sim.stats.frames_duplicated} frames sent twice; order status pushed before its fills; "
            f"trades_deduplicated +{dups:g}"
        )
        res.verdict = await env.finish()


async def nats_restart(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    hold = 2.0 if opts.quick else 15.0
    async with ChaosEnv(opts, workdir) as env:
        res.log_path = env.svc.log_path
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                await asyncio.to_thread(env.nats.stop, kill=True)
                await env.wait_observed(obs, lambda o: o.saw_reason("nats"), 15)
                await asyncio.sleep(hold)
                await asyncio.to_thread(env.nats.start)
                await env.svc.wait_ready(READY_WITHIN_S)
        res.checks.append(Check("readiness named nats", obs.saw_reason("nats"), str(obs.reason_texts())))
        res.checks.append(
            Check("nats_connected went to 0", obs.min("hl_monitor_nats_connected") == 0, "hl_monitor_nats_connected")
        )
        depth = obs.max("hl_monitor_outbox_depth")
        res.checks.append(Check("outbox held the signals", depth >= 1, f"max outbox_depth {depth:g}"))
        res.notes.append(f"nats-server SIGKILLed for {hold:g} s and restarted on the same store; max outbox {depth:g}")
        res.verdict = await env.finish()


async def _stream_last_seq(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        return (await nc.jetstream().stream_info(STREAM)).state.last_seq
    finally:
        await nc.close()


async def lost_writes(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    """What an OS crash does to a server that acknowledged before flushing: the store is copied while whales
    trade, more signals are acknowledged, the server is killed and the old copy put back."""
    more = 3.0 if opts.quick else 15.0
    backup = workdir / "nats-copy"
    async with ChaosEnv(opts, workdir) as env:
        res.log_path = env.svc.log_path
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                await asyncio.to_thread(shutil.copytree, env.nats.store, backup)
                copied_at = await _stream_last_seq(env.nats.url)
                await asyncio.sleep(more)  # acknowledged after the copy: only in the server's memory and files
                acked = await _stream_last_seq(env.nats.url)
                await asyncio.to_thread(env.nats.stop, kill=True)
                await asyncio.to_thread(shutil.rmtree, env.nats.store)
                await asyncio.to_thread(shutil.copytree, backup, env.nats.store)
                await asyncio.to_thread(env.nats.start)
                await env.wait_observed(obs, lambda o: o.delta("hl_monitor_replayed_total", kind="signal") > 0, 30)
                await env.svc.wait_ready(READY_WITHIN_S)
        replayed = obs.delta("hl_monitor_replayed_total", kind="signal")
        res.checks.append(
            Check("signals acknowledged after the copy", acked > copied_at, f"stream seq {copied_at} → {acked}")
        )
        res.checks.append(Check("replay counted", replayed > 0, f"replayed_total{{kind=signal}} +{replayed:g}"))
        res.notes.append(
            f"store copied at stream seq {copied_at}, {acked - copied_at} more acknowledged in {more:g} s, "
            f"kill -9, copy restored; {replayed:g} acknowledged signals re-published"
        )
        res.verdict = await env.finish()


async def db_outage(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    if opts.db != "mariadb":
        raise ChaosError("the database outage scenario needs --db mariadb (the relay is cut in front of MariaDB)")
    hold = opts.db_outage_s
    async with ChaosEnv(opts, workdir) as env:
        res.log_path = env.svc.log_path
        relay = env.relay
        assert relay is not None
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(WARM_S)
            async with env.observe() as obs:
                await relay.stop()
                await asyncio.sleep(hold)
                await relay.start()
                await env.svc.wait_ready(READY_WITHIN_S)
        res.checks.append(Check("readiness named the database", obs.saw_reason("database"), str(obs.reason_texts())))
        res.checks.append(Check("db_up went to 0", obs.min("hl_monitor_db_up") == 0, "hl_monitor_db_up"))
        retries = obs.delta("hl_monitor_writer_retries_total")
        res.checks.append(Check("writer retries counted", retries >= 1, f"writer_retries +{retries:g}"))
        res.notes.append(f"every MariaDB connection cut and refused for {hold:g} s; writer_retries +{retries:g}")
        res.verdict = await env.finish()


async def kill9(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    # A restarted process cannot know the REST weight its previous lives spent: each recovery (userFillsByTime,
    # orderStatus of every pending order) then meets the exchange's 429s and waits for the one-minute window.
    # That is correct but slow; CI raises the sim's REST limit, `make chaos` keeps the real one and waits longer.
    rest_limit = KILL_SIM_REST_WEIGHT if opts.quick else SimConfig().rest_weight_per_minute
    sim_cfg = SimConfig(
        clearinghouse_push_interval=0.3,
        seed=opts.seed,
        max_new_connections_per_minute=KILL_SIM_NEW_CONNECTIONS,
        rest_weight_per_minute=rest_limit,
    )
    settle = DELIVERY_STALL_S if opts.quick else REST_WINDOW_SETTLE_S
    async with ChaosEnv(opts, workdir, sim_config=sim_cfg, settle_stall_s=settle) as env:
        res.log_path = env.svc.log_path
        svc = env.svc
        ready_at_kill = 0
        delays: list[float] = []
        # First a normal start: an address's first snapshot only seeds its watermark (trades before it are history).
        await env.start_service()
        await asyncio.sleep(WARM_S)
        await svc.kill9()
        async with env.trading():
            for point in range(opts.kill_points):
                await svc.start()
                if point % KILL_DURING_STARTUP_EVERY == 0:
                    # Start-up: from interpreter start to connecting, restoring state, subscribing.
                    delay = env.rng.uniform(*KILL_STARTUP_RANGE_S)
                else:
                    await svc.wait_http(READY_WITHIN_S)  # past import time: the service is doing real work
                    delay = env.rng.uniform(*KILL_RUNNING_RANGE_S)
                delays.append(delay)
                await asyncio.sleep(delay)
                if await svc.readiness() == {}:
                    ready_at_kill += 1
                await svc.kill9()
            await env.start_service(within=READY_WITHIN_S)
            await asyncio.sleep(WARM_S)
        kills = svc.kills - 1  # the warm-up kill does not count
        res.checks.append(
            Check(f"{opts.kill_points} SIGKILLs while trading", kills == opts.kill_points, f"kills {kills}")
        )
        signalled = sum(1 for code in svc.exit_codes if code == -9)
        res.checks.append(Check("every kill was a real SIGKILL", signalled == svc.kills, f"{svc.exit_codes[:5]}..."))
        res.notes.append(
            f"{kills} kills ({kills - len(range(0, opts.kill_points, KILL_DURING_STARTUP_EVERY))} after the HTTP port "
            f"answered, {ready_at_kill} of them while ready; the rest during start-up); sim new-connection limit "
            f"raised for the restarts, REST weight limit {rest_limit}/min"
        )
        res.verdict = await env.finish()


async def clock_skew(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    extra = {"HL_MONITOR__RETENTION__INTERVAL": "1"}  # the cleaner runs all the time against skewed rows
    # Four starts within half a minute spend the exchange's one-minute REST window (each start's recovery reads
    # order statuses and states; a new process cannot know what the killed one spent), so the last recovery may
    # meet 429s and wait for the window: settle as long as that wait.
    async with ChaosEnv(opts, workdir, service_env=extra, settle_stall_s=REST_WINDOW_SETTLE_S) as env:
        res.log_path = env.svc.log_path
        ex = env.sim.exchange
        steady: list[Observation] = []
        for skew in (-SKEW_S, SKEW_S):
            ex._clock = _skewed_clock(skew)  # the exchange's wall clock (the sim takes it at construction only)
            await env.start_service()
            async with env.trading():
                async with env.observe() as obs:
                    await asyncio.sleep(2 * WARM_S)
                steady.append(obs)
                await env.svc.kill9()
                await asyncio.sleep(WARM_S)  # trades while down: recovered from the skewed watermark
                await env.start_service()
                await asyncio.sleep(WARM_S)
            if skew < 0:
                await env.svc.terminate()
        ready = all(o.always_ready() for o in steady)
        res.checks.append(Check("readiness stayed 200 under skew", ready, str([o.reason_texts() for o in steady])))
        stale = sum(o.delta("hl_monitor_reconnects_total", reason="stale_canary") for o in steady)
        res.checks.append(Check("no stale reconnects caused by skew", stale == 0, f"stale reconnects {stale:g}"))
        res.notes.append(f"exchange clock {-SKEW_S / 3600:g} h then {SKEW_S / 3600:+g} h vs local, kill -9 in each")
        res.verdict = await env.finish()


def _skewed_clock(offset: float) -> Callable[[], float]:
    def clock() -> float:
        return time.time() + offset

    return clock


class _StoreFault:
    """Makes a directory unwritable or full: a tmpfs mount when root (chmod does not stop root), else chmod."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        self.chmodded = False
        self.replaced = False
        self._aside = path.with_name(path.name + ".aside")

    @staticmethod
    def can_mount() -> bool:
        return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0

    def _mount(self, options: str) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], capture_output=True)
        self.mounted = done.returncode == 0
        return self.mounted

    def unwritable(self) -> str:
        if os.geteuid() == 0:
            if self._mount("ro,size=1m"):
                return "read-only tmpfs mounted over the store"
            # Root without mount rights (a container): a file where the store directory should be.
            self.path.rename(self._aside)
            self.path.write_bytes(b"")
            self.replaced = True
            return "a plain file in place of the store directory"
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o500)
        self.chmodded = True
        return "store directory chmod 0500"

    def full(self) -> str | None:
        if self.can_mount() and self._mount(f"size={DISK_FULL_TMPFS}"):
            filler = self.path / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as fh:
                while True:
                    fh.write(b"\0" * (1 << 20))
            return f"{DISK_FULL_TMPFS} tmpfs, filled"
        return None

    def fix(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True, capture_output=True)
            self.mounted = False
        if self.chmodded:
            self.path.chmod(0o700)
            self.chmodded = False
        if self.replaced:
            self.path.unlink()
            self._aside.rename(self.path)
            self.replaced = False


async def store_disk(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    async with ChaosEnv(opts, workdir, embedded_nats=True) as env:
        res.log_path = env.svc.log_path
        svc = env.svc
        store = env.nats.store
        fault = _StoreFault(store)
        await env.start_service()
        async with env.trading():
            await asyncio.sleep(2 * WARM_S)
            await svc.terminate()
            try:
                phases = [("unwritable", fault.unwritable)]
                if _StoreFault.can_mount():
                    phases.append(("full", fault.full))  # type: ignore[arg-type]
                else:
                    res.notes.append("disk-full phase needs root for a tmpfs; only the unwritable phase ran")
                for name, make in phases:
                    how = await asyncio.to_thread(make)
                    log_from = len(svc.log_text())
                    await svc.start()
                    code = await svc.wait_exit(READY_WITHIN_S)
                    text = svc.log_text()[log_from:]
                    clear = "nats.store_dir" in text and any(
                        words in text for words in ("not writable", "cannot be created", "MiB free", "is full")
                    )
                    line = next((ln for ln in text.splitlines() if "nats.store_dir" in ln), text[-300:])
                    res.checks.append(Check(f"store {name}: refused with exit code 1", code == 1, f"code {code}"))
                    res.checks.append(Check(f"store {name}: clear error", clear, line.strip()[:200]))
                    res.notes.append(f"{name} ({how}): {line.strip()[:160]}")
                    await asyncio.to_thread(fault.fix)
            finally:
                await asyncio.to_thread(fault.fix)
            await env.start_service()
            await asyncio.sleep(WARM_S)
        res.verdict = await env.finish()


async def soak(opts: ChaosOptions, workdir: Path, res: ScenarioResult) -> None:
    """A compressed busy day with memory and queues watched (`chaos.soak`, which builds on this module)."""
    from hl_monitor.chaos.soak import soak as run  # here, not at the top: soak imports Check/ScenarioResult from us

    await run(opts, workdir, res)


async def _wait_for_state(env: ChaosEnv, address: str, state: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            _, status = await env.svc.get("/status")
            if _address_state(status, address) == state:
                return
        await asyncio.sleep(0.2)
    raise ChaosError(f"{address} did not reach state {state!r} within {within:g} s")


SCENARIOS: Final = {
    s.name: s
    for s in (
        Scenario("silent_stall", "Silent channel stall (socket open, data withheld)", silent_stall),
        Scenario("silent_fills", "userFills alone silent (canary still flowing)", silent_fills),
        Scenario("abrupt_close", "Abrupt close mid-order", abrupt_close),
        Scenario("dropped_ack", "Dropped subscribe ack", dropped_ack),
        Scenario("reconnect_storm", "Reconnect storm", reconnect_storm),
        Scenario("user_cap", "User-cap errors", user_cap),
        Scenario("dup_reorder", "Duplicated and reordered frames", dup_reorder),
        Scenario("nats_restart", "NATS killed and restarted", nats_restart),
        Scenario("lost_writes", "NATS lost acknowledged writes (store copy restored)", lost_writes),
        Scenario("db_outage", "Database down", db_outage, needs_mariadb=True),
        Scenario("kill9", "Service kill -9 at random points", kill9),
        Scenario("store_disk", "Embedded NATS store unwritable / full", store_disk),
        Scenario("clock_skew", "Clock skew exchange vs local", clock_skew),
        Scenario("soak", "Soak: busy day at 20x, memory and queues flat", soak),
    )
}


async def run_scenario(name: str, opts: ChaosOptions, workdir: Path) -> ScenarioResult:
    """Run one scenario; never raises for a scenario failure (it is in the result)."""
    scenario = SCENARIOS[name]
    res = ScenarioResult(name, scenario.title)
    started = time.monotonic()
    where = workdir / name
    shutil.rmtree(where, ignore_errors=True)  # stores from an earlier run would hold other signals
    try:
        await scenario.run(opts, where, res)
    except (ChaosError, OSError, TimeoutError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a harness bug must still produce a row, with the traceback
        res.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    res.seconds = time.monotonic() - started
    if res.error and res.log_path is not None and res.log_path.exists():
        tail = res.log_path.read_text(errors="replace").splitlines()[-15:]
        res.error += "\nservice log tail:\n" + "\n".join(tail)
    return res
