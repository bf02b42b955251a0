"""`hl-monitor db upgrade|current`, `hl-monitor addresses add|update|remove|list|import|show`, `hl-monitor positions`.

Address commands write `hlm_addresses` directly; a running service notices within a second (it polls
the table's change marker). `addresses list` and `addresses show` also account for the config's
`addresses.initial` (each row says which source the service takes the address from). `addresses show` prints
what the database holds for one address as JSON.
`positions` prints the open perp positions of the stored position documents (`hlm_positions`), largest
first. Invalid input (an address that is not 0x + 40 hex digits, an unknown tier, a malformed import line, a
`--min-usd` or `--min-notional-usd` that is not a non-negative number, a malformed symbol list) is reported with
its position and exits 2 without writing anything.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import orjson
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from hl_monitor.config import Config, mask_url
from hl_monitor.domain.address import TIERS, WatchedAddress, parse_address, parse_min_notional, parse_symbol_list
from hl_monitor.errors import InvalidAddressError, StorageError
from hl_monitor.storage import migrate
from hl_monitor.storage import tables as t
from hl_monitor.storage.repository import AddressTable, Repository, create_engine, perp_positions, position_matches
from hl_monitor.storage.tables import COIN_LEN, LABEL_LEN
from hl_monitor.tracking.portfolio import AddressPortfolio
from hl_monitor.tracking.position_events import PerpPosition, format_decimal
from hl_monitor.tracking.state import AggregationRecord, Watermark

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1  # `addresses show`/`update` of an address neither the table nor the config holds
DEFAULT_SHOWN_SIGNALS: Final = 10
EXIT_USAGE: Final = 2  # same as the top-level CLI's config/usage code: do not restart-loop on it
PRIORITY_MAX: Final = 2**31 - 1  # the column is a signed INT
PRICE_DIGITS: Final = 6  # significant digits of prices in the positions table (the JSON keeps them all)
PERCENT: Final = Decimal(100)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Change:
    address: str
    label: str | None = None
    tier: str | None = None
    priority: int | None = None
    is_active: bool | None = None
    server_id: int | None = None
    min_notional_usd: Decimal | None = None
    allow_symbols: tuple[str, ...] | None = None
    deny_symbols: tuple[str, ...] | None = None


# ---------------------------------------------------------------- validation (argparse types)


def _address(value: str) -> str:
    try:
        return parse_address(value)
    except InvalidAddressError as exc:
        raise argparse.ArgumentTypeError(_not_an_address(exc)) from None


def _not_an_address(exc: InvalidAddressError) -> str:
    """The CLI's wording (unchanged since its first release): operators' scripts may grep for it."""
    return f"{exc.value!r} is not an address (expected 0x followed by 40 hex digits)"


def _label(value: str) -> str:
    if len(value) > LABEL_LEN:
        raise argparse.ArgumentTypeError(f"label is {len(value)} characters; at most {LABEL_LEN}")
    return value


def _min_notional(value: str) -> Decimal:
    try:
        return parse_min_notional(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _symbol_list(value: str) -> tuple[str, ...]:
    try:
        return parse_symbol_list(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _priority(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not 0 <= number <= PRIORITY_MAX:
        raise argparse.ArgumentTypeError(f"priority must be between 0 and {PRIORITY_MAX}, got {number}")
    return number


# ---------------------------------------------------------------- running


def _with_engine(args: argparse.Namespace, action: Callable[[AsyncEngine, Config], Awaitable[T]]) -> T:
    from hl_monitor.cli import config_from_args

    cfg = config_from_args(args)

    async def main() -> T:
        engine = create_engine(cfg)
        try:
            return await action(engine, cfg)
        except SQLAlchemyError as exc:
            raise StorageError(f"database {mask_url(cfg.database.url)}: {type(exc).__name__}: {exc.args[0]}") from None
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _db_upgrade(args: argparse.Namespace) -> int:
    from hl_monitor.cli import config_from_args

    cfg = config_from_args(args)
    try:
        legacy = cfg.database.legacy_tables or args.legacy_tables
        asyncio.run(migrate.upgrade(cfg.database_url(), args.revision, legacy_tables=legacy))
    except SQLAlchemyError as exc:
        raise StorageError(f"database {mask_url(cfg.database.url)}: {type(exc).__name__}: {exc.args[0]}") from None
    revision = migrate.head_revision() if args.revision == "head" else args.revision
    print(f"database {mask_url(cfg.database.url)} is at revision {revision}")
    return EXIT_OK


def _db_current(args: argparse.Namespace) -> int:
    async def action(engine: AsyncEngine, cfg: Config) -> int:
        current = await migrate.current_revision(engine)
        head = migrate.head_revision()
        state = "up to date" if current == head else "outdated: run `hl-monitor db upgrade`"
        print(f"current: {current or 'none'}  head: {head}  ({state})")
        return EXIT_OK

    return _with_engine(args, action)


async def _table(engine: AsyncEngine) -> AddressTable:
    await migrate.check_schema(engine)
    return AddressTable(engine)


def _change(args: argparse.Namespace, address: str, label: str | None) -> _Change:
    return _Change(
        address,
        label=label,
        tier=args.tier,
        priority=args.priority,
        server_id=args.server_id,
        min_notional_usd=args.min_notional_usd,
        allow_symbols=args.allow_symbols,
        deny_symbols=args.deny_symbols,
    )


def _addresses_add(args: argparse.Namespace) -> int:
    changes = [_change(args, a, args.label) for a in dict.fromkeys(args.address)]

    async def action(engine: AsyncEngine, cfg: Config) -> int:
        count = await (await _table(engine)).add(changes)
        print(f"added or updated {count} address{'es' if count != 1 else ''}")
        return EXIT_OK

    return _with_engine(args, action)


def _addresses_update(args: argparse.Namespace) -> int:
    change = _change(args, "", args.label)
    fields = {k: v for k, v in dataclasses.asdict(change).items() if k != "address" and v is not None}
    if not fields:
        print("hl-monitor: nothing to change: give at least one field option", file=sys.stderr)
        return EXIT_USAGE

    async def action(engine: AsyncEngine, cfg: Config) -> list[str]:
        table = await _table(engine)
        unknown = [a for a in dict.fromkeys(args.address) if await table.get(a) is None]
        if unknown:
            return unknown
        for address in dict.fromkeys(args.address):
            await table.update(address, **fields)
        return []

    unknown = _with_engine(args, action)
    if unknown:
        print(f"hl-monitor: not in the address table (add them first): {', '.join(unknown)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    count = len(set(args.address))
    print(f"updated {count} address{'es' if count != 1 else ''}")
    return EXIT_OK


def _addresses_remove(args: argparse.Namespace) -> int:
    if not args.address and args.label_prefix is None:
        print("hl-monitor: name addresses to remove, or --label-prefix", file=sys.stderr)
        return EXIT_USAGE

    async def action(engine: AsyncEngine, cfg: Config) -> int:
        table = await _table(engine)
        addresses = list(args.address)
        if args.label_prefix is not None:
            # In bulk by tag, e.g. everything automatic discovery added (`discovered:auto:`, README "Discovery").
            rows = await table.list(include_inactive=False)
            addresses += [r["address"] for r in rows if r["label"].startswith(args.label_prefix)]
        count = await table.remove(addresses, purge=args.purge) if addresses else 0
        unknown = len(set(addresses)) - count
        print(f"{'deleted' if args.purge else 'deactivated'} {count}" + (f"; {unknown} not watched" if unknown else ""))
        return EXIT_OK

    return _with_engine(args, action)


SOURCE_TABLE: Final = "table"  # an active row of the address table
SOURCE_CONFIG: Final = "addresses.initial"  # the config list; the table wins where both name an address


def _config_row(address: str) -> dict[str, Any]:
    """An `addresses.initial` entry shown like a table row: the defaults the service watches it with."""
    entry = WatchedAddress(address=address)
    return {
        "address": address,
        "label": entry.label,
        "tier": entry.tier,
        "priority": entry.priority,
        "is_active": True,
        "server_id": entry.server_id,
        "min_notional_usd": str(entry.min_notional_usd),
        "allow_symbols": [],
        "deny_symbols": [],
        "created_at": None,
        "updated_at": None,
    }


def with_sources(table_rows: Sequence[dict[str, Any]], initial: Sequence[str]) -> list[dict[str, Any]]:
    """Table rows and the `addresses.initial` addresses, one row per address, each with `source`: where the
    service takes it from, as its address book merges them (an active table row first, then the config list;
    None for an inactive row the config does not name: not watched)."""
    configured = list(dict.fromkeys(parse_address(a) for a in initial))
    in_config = set(configured)
    rows: list[dict[str, Any]] = []
    for row in table_rows:
        source = SOURCE_TABLE if row["is_active"] else SOURCE_CONFIG if row["address"] in in_config else None
        rows.append({**row, "source": source})
    listed = {row["address"] for row in rows}
    rows += [{**_config_row(a), "source": SOURCE_CONFIG} for a in configured if a not in listed]
    return rows


def _addresses_list(args: argparse.Namespace) -> int:
    async def action(engine: AsyncEngine, cfg: Config) -> list[dict[str, Any]]:
        table_rows = await (await _table(engine)).list(include_inactive=True)
        return with_sources(table_rows, cfg.addresses.initial)

    rows = [row for row in _with_engine(args, action) if args.all or row["source"] is not None]
    if args.label_prefix is not None:
        rows = [row for row in rows if row["label"].startswith(args.label_prefix)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        server = "-" if row["server_id"] is None else str(row["server_id"])
        active = "active" if row["is_active"] else "inactive"
        source = f"from {row['source']}" if row["source"] is not None else "not watched"
        print(
            f"{row['address']}  {row['tier']:<7}  prio {row['priority']:<6}  server {server:<4}  "
            f"{active:<8}  {source:<22}  {row['label']}"
        )
    print(f"{len(rows)} address{'es' if len(rows) != 1 else ''}", file=sys.stderr)
    return EXIT_OK


async def address_details(
    engine: AsyncEngine, address: str, signals: int, initial: Sequence[str] = ()
) -> dict[str, Any] | None:
    """What the database holds for one address: its row (or, for an address only in `initial`, the config's
    entry) with its `source`, positions and watermark as last persisted, pending aggregations and the newest
    `signals` signals (newest first). None when neither the address table nor `initial` has it."""
    table_row = await (await _table(engine)).get(address)
    found = with_sources([table_row] if table_row is not None else [], initial)
    matching = [r for r in found if r["address"] == address]
    if not matching:
        return None
    row = matching[0]
    repo = Repository(engine)
    positions = await _by_address(engine, t.positions, address)
    watermark_raw = await _by_address(engine, t.watermarks, address)
    watermark = None
    if watermark_raw is not None:
        wm = msgspec.json.decode(watermark_raw, type=Watermark)
        watermark = {"time": wm.time, "tid": wm.tid, "floor": wm.floor, "seeded": wm.seeded, "seen_keys": len(wm.seen)}
    pending = []
    for stored in await repo.load_pending_aggregations():
        if stored.address != address:
            continue
        record = msgspec.json.decode(stored.record, type=AggregationRecord)
        pending.append(
            {
                "oid": None if stored.twap_id is not None else stored.oid,
                "twap_id": stored.twap_id,
                "coin": stored.coin,
                "direction": record.open_close,
                "dir": record.dir,
                "size": str(record.size),
                "fill_count": stored.fill_count,
                "first_fill_time": stored.first_fill_time,
                "last_fill_time": stored.last_fill_time,
                "status": record.status,
                "signal_id": record.signal_id,
            }
        )
    s = t.signals.c
    query = (
        sa.select(s.payload, s.published, s.suppressed)
        .where(s.address == address)
        .order_by(s.id.desc())
        .limit(max(signals, 0))
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    # The stored payload is embedded verbatim: its decimals are exact JSON numbers a float parse would round.
    # A suppressed row needs no publish (`published` is set) but never went out: shown as not published.
    last = [
        {"published": bool(published) and not suppressed, "suppressed": bool(suppressed), "signal": orjson.Fragment(p)}
        for p, published, suppressed in rows
    ]
    return {
        **row,
        "positions": orjson.Fragment(positions) if positions is not None else None,
        "watermark": watermark,
        "pending_orders": pending,
        "last_signals": last,
    }


async def _by_address(engine: AsyncEngine, table: sa.Table, address: str) -> str | None:
    async with engine.connect() as conn:
        value = (await conn.execute(sa.select(table.c.payload).where(table.c.address == address))).scalar()
    return None if value is None else str(value)


def _addresses_show(args: argparse.Namespace) -> int:
    async def action(engine: AsyncEngine, cfg: Config) -> dict[str, Any] | None:
        return await address_details(engine, args.address, args.signals, cfg.addresses.initial)

    details = _with_engine(args, action)
    if details is None:
        print(f"hl-monitor: {args.address} is not in the address table nor in addresses.initial", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(orjson.dumps(details, option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK


# ---------------------------------------------------------------- positions


def _min_usd(value: str) -> Decimal:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise argparse.ArgumentTypeError(f"must be a dollar amount of 0 or more, got {value!r}")
    return number


def _symbol(value: str) -> str:
    text = value.strip()
    if not text or len(text) > COIN_LEN:
        raise argparse.ArgumentTypeError(f"{value!r} is not a symbol or coin (1 to {COIN_LEN} characters)")
    return text


def _exact(value: Decimal | None) -> str | None:
    return None if value is None else format_decimal(value)


def _price(value: Decimal | None) -> str:
    """`PRICE_DIGITS` significant digits, plain notation (a 1e-10 price stays readable)."""
    if value is None:
        return "-"
    places = max(0, PRICE_DIGITS - 1 - value.adjusted())
    return format_decimal(round(value, places))


def _usd(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def matching_positions(
    docs: Sequence[AddressPortfolio], symbol: str | None, min_usd: Decimal | None
) -> list[tuple[str, PerpPosition]]:
    """(address, position) of every perp position that `position_matches`, largest value first."""
    found = [
        (doc.address, pos) for doc in docs for _, pos in perp_positions(doc) if position_matches(pos, symbol, min_usd)
    ]
    found.sort(key=lambda item: (-(item[1].position_value_usd or 0), item[0], item[1].coin))
    return found


def position_json(address: str, pos: PerpPosition) -> dict[str, Any]:
    """One position as JSON-able data, decimals exact (as strings)."""
    return {
        "address": address,
        "coin": pos.coin,
        "symbol": pos.symbol,
        "dex": pos.dex,
        "side": pos.side,
        "size": _exact(pos.size),
        "entry_px": _exact(pos.entry_px),
        "mark_px": _exact(pos.mark_px),
        "position_value_usd": _exact(pos.position_value_usd),
        "unrealized_pnl": _exact(pos.unrealized_pnl),
        "leverage": pos.leverage,
        "leverage_type": pos.leverage_type,
        "liquidation_px": _exact(pos.liquidation_px),
        "liquidation_distance": _exact(pos.liquidation_distance),
        "updated_at": pos.updated_at,
    }


_POSITION_HEADER: Final = (
    "ADDRESS",
    "COIN",
    "SIDE",
    "SIZE",
    "ENTRY",
    "MARK",
    "VALUE USD",
    "UPNL",
    "LEV",
    "LIQ PX",
    "DIST",
)


def _table_cells(address: str, pos: PerpPosition) -> tuple[str, ...]:
    leverage = (
        "-" if pos.leverage is None else f"{pos.leverage}x" + (f" {pos.leverage_type}" if pos.leverage_type else "")
    )
    distance = "-" if pos.liquidation_distance is None else f"{pos.liquidation_distance * PERCENT:.2f}%"
    return (
        address,
        pos.coin,
        pos.side,
        format_decimal(pos.size),
        _price(pos.entry_px),
        _price(pos.mark_px),
        _usd(pos.position_value_usd),
        _usd(pos.unrealized_pnl),
        leverage,
        _price(pos.liquidation_px),
        distance,
    )


def format_positions_table(rows: Sequence[tuple[str, PerpPosition]]) -> str:
    """Aligned columns: text left, numbers right."""
    lines = [_POSITION_HEADER, *(_table_cells(address, pos) for address, pos in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_POSITION_HEADER))]
    left = {0, 1, 2}  # address, coin, side
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _positions(args: argparse.Namespace) -> int:
    async def action(engine: AsyncEngine, cfg: Config) -> list[AddressPortfolio]:
        await migrate.check_schema(engine)
        return await Repository(engine).list_positions(args.symbol, args.min_usd)

    rows = matching_positions(_with_engine(args, action), args.symbol, args.min_usd)
    if args.json:
        print(json.dumps([position_json(address, pos) for address, pos in rows], indent=2))
        return EXIT_OK
    if rows:
        print(format_positions_table(rows))
    addresses = len({address for address, _ in rows})
    print(
        f"{len(rows)} position{'s' if len(rows) != 1 else ''} of {addresses} address{'es' if addresses != 1 else ''}",
        file=sys.stderr,
    )
    return EXIT_OK


def parse_import(lines: Sequence[str], source: str) -> tuple[dict[str, str | None], list[str]]:
    """Addresses (with optional labels) from `address` or `address,label` lines; also the list of errors.

    Blank lines, `#` comments and a leading `address,label` header are skipped; a later line for the
    same address wins.
    """
    entries: dict[str, str | None] = {}
    errors: list[str] = []
    for number, fields in enumerate(csv.reader(lines), start=1):
        cells = [f.strip() for f in fields]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if not entries and not errors and cells[0].lower() == "address":
            continue
        if len(cells) > 2:
            errors.append(f"{source}:{number}: expected `address` or `address,label`, got {len(cells)} fields")
            continue
        try:
            address = parse_address(cells[0])
        except InvalidAddressError as exc:
            errors.append(f"{source}:{number}: {_not_an_address(exc)}")
            continue
        label = cells[1] if len(cells) == 2 and cells[1] else None
        if label is not None and len(label) > LABEL_LEN:
            errors.append(f"{source}:{number}: label is {len(label)} characters; at most {LABEL_LEN}")
            continue
        entries[address] = label
    return entries, errors


def _addresses_import(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"hl-monitor: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    entries, errors = parse_import(text.splitlines(), str(path))
    if errors:
        for error in errors:
            print(f"hl-monitor: {error}", file=sys.stderr)
        print(
            f"hl-monitor: nothing imported ({len(errors)} invalid line{'s' if len(errors) != 1 else ''})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not entries:
        print(f"hl-monitor: {path} holds no addresses", file=sys.stderr)
        return EXIT_USAGE
    changes = [_change(args, address, label) for address, label in entries.items()]

    async def action(engine: AsyncEngine, cfg: Config) -> int:
        count = await (await _table(engine)).add(changes)
        print(f"imported {count} address{'es' if count != 1 else ''} from {path}")
        return EXIT_OK

    return _with_engine(args, action)


# ---------------------------------------------------------------- registration


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hl_monitor.cli import add_config_arg

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations (run before `run`, after every upgrade)")
    add_config_arg(up)
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.add_argument(
        "--legacy-tables",
        action="store_true",
        help="also create the old service's tables (as database.legacy_tables = true does)",
    )
    up.set_defaults(handler=_db_upgrade)
    current = db_sub.add_parser("current", help="show the database's schema revision")
    add_config_arg(current)
    current.set_defaults(handler=_db_current)

    addr = sub.add_parser("addresses", help="manage watched addresses")
    addr_sub = addr.add_subparsers(dest="addresses_command", metavar="ACTION", required=True)

    def fields(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tier", choices=TIERS, default=None, help="precise | wide | auto (new rows: auto)")
        parser.add_argument("--priority", type=_priority, default=None, help="higher gets precise slots first")
        parser.add_argument("--server-id", type=int, default=None, help="pin to the instance with this server_id")
        parser.add_argument(
            "--min-notional-usd",
            type=_min_notional,
            default=None,
            metavar="N",
            help="publish only signals worth at least N dollars (beside signals.min_notional_usd; the higher applies)",
        )
        parser.add_argument(
            "--allow-symbols",
            type=_symbol_list,
            default=None,
            metavar="LIST",
            help='publish only signals of these symbols or coins, e.g. "BTC,ETHUSDC" ("" removes the list)',
        )
        parser.add_argument(
            "--deny-symbols",
            type=_symbol_list,
            default=None,
            metavar="LIST",
            help='never publish signals of these symbols or coins ("" removes the list)',
        )

    add = addr_sub.add_parser("add", help="watch addresses (or update their fields and filters)")
    add_config_arg(add)
    add.add_argument("address", nargs="+", type=_address, metavar="ADDRESS")
    add.add_argument("--label", type=_label, default=None)
    fields(add)
    add.set_defaults(handler=_addresses_add)

    update = addr_sub.add_parser("update", help="change fields and filters of addresses already in the table")
    add_config_arg(update)
    update.add_argument("address", nargs="+", type=_address, metavar="ADDRESS")
    update.add_argument("--label", type=_label, default=None)
    fields(update)
    update.set_defaults(handler=_addresses_update)

    remove = addr_sub.add_parser("remove", help="stop watching addresses")
    add_config_arg(remove)
    remove.add_argument("address", nargs="*", type=_address, metavar="ADDRESS")
    remove.add_argument(
        "--label-prefix", default=None, metavar="P", help="also every active address whose label starts with P"
    )
    remove.add_argument("--purge", action="store_true", help="delete the rows instead of deactivating them")
    remove.set_defaults(handler=_addresses_remove)

    listing = addr_sub.add_parser("list", help="list watched addresses")
    add_config_arg(listing)
    listing.add_argument("--all", action="store_true", help="include inactive addresses nobody watches")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument(
        "--label-prefix", default=None, metavar="P", help="only labels starting with P (discovered:auto: …)"
    )
    listing.set_defaults(handler=_addresses_list)

    show = addr_sub.add_parser("show", help="one address as stored: row, positions, watermark, pending, last signals")
    add_config_arg(show)
    show.add_argument("address", type=_address, metavar="ADDRESS")
    show.add_argument(
        "--signals", type=int, default=DEFAULT_SHOWN_SIGNALS, metavar="N", help="newest signals to show (default 10)"
    )
    show.set_defaults(handler=_addresses_show)

    positions = sub.add_parser("positions", help="open perp positions of the watched addresses, from the database")
    add_config_arg(positions)
    positions.add_argument("--symbol", type=_symbol, default=None, help="only this symbol or coin (BTCUSDC or BTC)")
    positions.add_argument(
        "--min-usd", type=_min_usd, default=None, metavar="N", help="only positions worth at least N dollars"
    )
    positions.add_argument("--json", action="store_true", help="print JSON (exact decimals as strings)")
    positions.set_defaults(handler=_positions)

    imp = addr_sub.add_parser("import", help="watch every address in a file (`address` or `address,label` lines)")
    add_config_arg(imp)
    imp.add_argument("file", type=Path, metavar="FILE")
    fields(imp)
    imp.set_defaults(handler=_addresses_import)
