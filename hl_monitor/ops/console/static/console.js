/* hl-monitor console: hash-routed views over the service's JSON and its live SSE feed.
   Every value from the service enters the page through textContent or an attribute (never innerHTML), so a
   label such as <img src=x onerror=alert(1)> is shown as text. The admin token lives in sessionStorage only. */
"use strict";
(function () {
  const TOKEN_KEY = "hlm.adminToken";
  const FEED_MAX = 200; // live items kept on the page; older ones fall off the bottom
  const SEEN_MAX = 5000; // signal, fill and position-event ids remembered so a resumed stream never shows one twice
  const BOOK_SETTLE_MS = 1500; // after an address change, read again once the service's book has applied it
  // Position events and fills arrive on the live feed; marks move values without an event, so the whales and
  // address pages also re-read their JSON this often.
  const MARKS_REFRESH_MS = 30000;
  const LIVE_REDRAW_MS = 300; // a burst of position events and fills redraws a page once, this long after the first

  const state = {
    config: { admin: false, read_only: true, fills: false },
    feed: [], // signals and fills, newest first
    fills: [], // fills, newest first (the address page's "Fills" panel)
    redraws: {}, // pending live redraws by page
    seen: new Set(),
    seenOrder: [],
    filters: { address: "", symbol: "", direction: "", min: "" },
    sort: { key: "account_value", dir: -1 },
    whaleFilter: { symbol: "", label: "" },
    timer: null,
    route: "",
  };

  // ---------------------------------------------------------------- DOM helpers (text only)

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const view = () => document.getElementById("view");
  function show(...nodes) { view().replaceChildren(...nodes); }
  function num(v) { return v === null || v === undefined || v === "" ? NaN : Number(v); }
  function usd(v) {
    const n = num(v);
    if (Number.isNaN(n)) return "—";
    return (n < 0 ? "-$" : "$") + Math.abs(n).toLocaleString(undefined, { maximumFractionDigits: 0 });
  }
  function px(v) {
    const n = num(v);
    return Number.isNaN(n) ? "—" : n.toLocaleString(undefined, { maximumSignificantDigits: 6 });
  }
  function pct(v) {
    const n = num(v);
    return Number.isNaN(n) ? "—" : (n * 100).toFixed(1) + "%";
  }
  function ago(ms) {
    if (!ms) return "—";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + "s ago";
    if (s < 3600) return Math.round(s / 60) + "m ago";
    if (s < 86400) return Math.round(s / 3600) + "h ago";
    return Math.round(s / 86400) + "d ago";
  }
  function short(a) { return a ? a.slice(0, 6) + "…" + a.slice(-4) : ""; }
  function sideClass(v) { return num(v) > 0 || v === "LONG" || v === "long" ? "long" : num(v) < 0 || v === "SHORT" || v === "short" ? "short" : ""; }
  // A buy (opening a long, closing a short) is green, a sell red, whatever the position's side.
  function dirClass(dir) { return /Open Long|Close Short|Buy|Short > Long/.test(dir || "") ? "long" : "short"; }
  function addressLink(address, label) {
    return h("a", { href: "#/address/" + encodeURIComponent(address), class: "addr" }, label || short(address));
  }
  function message(kind, text) { return h("div", { class: "msg " + kind, role: kind === "error" ? "alert" : "status" }, text); }

  async function getJSON(path, opts) {
    const res = await fetch(path, Object.assign({ headers: { Accept: "application/json" }, credentials: "omit" }, opts || {}));
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    return { ok: res.ok, status: res.status, body };
  }
  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
  async function admin(method, path, body) {
    const headers = { Accept: "application/json", Authorization: "Bearer " + token() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return getJSON(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  }

  // ---------------------------------------------------------------- routing

  function route() {
    clearInterval(state.timer);
    state.timer = null;
    const hash = location.hash || "#/whales";
    const [, name, arg] = hash.split("/");
    state.route = name || "whales";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === state.route);
    if (state.route === "address" && arg) return every(() => addressPage(decodeURIComponent(arg)));
    if (state.route === "live") return livePage();
    if (state.route === "market") return every(marketPage);
    if (state.route === "admin") return adminPage();
    state.route = "whales";
    return every(whalesPage);
  }
  function every(render) {
    const routeAtStart = location.hash;
    render();
    state.timer = setInterval(() => { if (location.hash === routeAtStart && !document.hidden) render(); }, MARKS_REFRESH_MS);
  }
  function currentAddress() {
    const [, name, arg] = (location.hash || "").split("/");
    return name === "address" && arg ? decodeURIComponent(arg) : null;
  }
  // Redraw the page showing `address` (or the whales page) once a burst of live events has passed.
  function redrawSoon(address) {
    const key = state.route === "whales" ? "whales" : state.route === "address" && currentAddress() === address ? "address" : null;
    if (key === null || state.redraws[key]) return;
    state.redraws[key] = setTimeout(() => {
      delete state.redraws[key];
      if (key === "whales" && state.route === "whales") whalesPage();
      if (key === "address" && currentAddress() === address) addressPage(address);
    }, LIVE_REDRAW_MS);
  }

  // ---------------------------------------------------------------- whales

  const WHALE_COLUMNS = [
    ["health", "", null],
    ["label", "Whale", (w) => (w.label || w.address).toLowerCase()],
    ["state", "Tier / state", (w) => w.state || ""],
    ["account_value", "Account value", (w) => num(w.account_value)],
    ["net_exposure", "Net exposure", (w) => num(w.net_exposure)],
    ["biggest", "Biggest position", (w) => num(w.biggest && w.biggest.position_value_usd)],
    ["entry", "Entry / mark", null],
    ["leverage", "Lev.", (w) => (w.biggest && w.biggest.leverage) || 0],
    ["liq", "Liq. distance", (w) => num(w.biggest && w.biggest.liquidation_distance)],
    ["upnl", "uPnL", (w) => num(w.biggest && w.biggest.unrealized_pnl)],
    ["last", "Last signal", (w) => (w.last_signal ? w.last_signal.time : 0)],
  ];

  function health(w) {
    if (w.state === "precise") return w.connection !== null && w.connection !== undefined ? ["green", "precise stream live"] : ["amber", "precise, connecting"];
    if (w.state === "wide") return ["green", "wide tier (tape)"];
    if (w.state === "over_budget") return ["amber", "over budget: wide until a slot frees"];
    if (w.state === "precise_elsewhere") return ["green", "tracked by another instance"];
    return ["grey", "not assigned yet"];
  }

  async function whalesPage() {
    const res = await getJSON("/ui/api/whales");
    if (state.route !== "whales") return;
    if (!res.ok) return show(h("h1", {}, "Whales"), message("error", "Could not load: " + ((res.body && res.body.error) || res.status)));
    const f = state.whaleFilter;
    const symbolIn = h("input", { placeholder: "Filter symbol (BTC)", value: f.symbol, "aria-label": "symbol filter", id: "whale-symbol",
      oninput: (e) => { f.symbol = e.target.value; draw(); } });
    const labelIn = h("input", { placeholder: "Filter label or address", value: f.label, "aria-label": "label filter", id: "whale-label",
      oninput: (e) => { f.label = e.target.value; draw(); } });
    const holder = h("div", { class: "scroll" });
    const count = h("span", { class: "muted" });
    function draw() {
      const sym = f.symbol.trim().toLowerCase(), lab = f.label.trim().toLowerCase();
      let rows = res.body.whales.filter((w) =>
        (!sym || w.symbols.some((s) => s.toLowerCase().includes(sym))) &&
        (!lab || (w.label || "").toLowerCase().includes(lab) || w.address.includes(lab)));
      const col = WHALE_COLUMNS.find((c) => c[0] === state.sort.key);
      if (col && col[2]) {
        const key = col[2];
        rows = rows.slice().sort((a, b) => {
          const x = key(a), y = key(b);
          const xn = typeof x === "number" && Number.isNaN(x), yn = typeof y === "number" && Number.isNaN(y);
          if (xn || yn) return xn - yn; // unknown values last either way
          return (x < y ? -1 : x > y ? 1 : 0) * state.sort.dir;
        });
      }
      count.textContent = rows.length + " of " + res.body.whales.length + " addresses";
      const head = h("tr", {}, WHALE_COLUMNS.map(([key, title, sortable]) => {
        const cls = [sortable ? "sortable" : "", state.sort.key === key ? (state.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : "",
          ["account_value", "net_exposure", "biggest", "leverage", "liq", "upnl"].includes(key) ? "num" : "",
          ["entry", "leverage", "upnl"].includes(key) ? "hide-narrow" : ""].join(" ");
        return h("th", { class: cls, "data-key": key, onclick: sortable ? () => {
          state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : -1 };
          draw();
        } : null }, title);
      }));
      const body = rows.map((w) => {
        const b = w.biggest;
        const [dot, why] = health(w);
        const s = w.last_signal;
        return h("tr", { "data-address": w.address },
          h("td", {}, h("span", { class: "dot " + dot, title: why, "aria-label": why })),
          h("td", {}, addressLink(w.address, w.label || short(w.address)), w.label ? h("div", { class: "addr muted" }, short(w.address)) : null),
          h("td", {}, (w.tier || "") + " / " + (w.state || "")),
          h("td", { class: "num" }, usd(w.account_value)),
          h("td", { class: "num " + sideClass(w.net_exposure) }, usd(w.net_exposure)),
          h("td", { class: "num" }, b ? h("span", { class: sideClass(b.size) }, (num(b.size) > 0 ? "LONG " : "SHORT ") + (b.symbol || b.coin) + " " + usd(b.position_value_usd)) : "—"),
          h("td", { class: "hide-narrow" }, b ? px(b.entry_px) + " / " + px(b.mark_px) : "—"),
          h("td", { class: "num hide-narrow" }, b && b.leverage ? b.leverage + "x" : "—"),
          h("td", { class: "num" }, b ? pct(b.liquidation_distance) : "—"),
          h("td", { class: "num hide-narrow " + (b ? sideClass(b.unrealized_pnl) : "") }, b ? usd(b.unrealized_pnl) : "—"),
          h("td", {}, s ? h("span", { class: dirClass(s.dir) }, s.dir + " " + s.symbol) : "—",
            s ? h("div", { class: "muted" }, usd(s.notional_usd) + " · " + ago(s.time)) : null));
      });
      holder.replaceChildren(h("table", { id: "whales" }, h("thead", {}, head), h("tbody", {}, body)));
    }
    draw();
    const focused = document.activeElement && document.activeElement.id;
    show(h("h1", {}, "Whales"), h("div", { class: "filters" }, symbolIn, labelIn, count), holder);
    if (focused === "whale-symbol" || focused === "whale-label") {
      const again = document.getElementById(focused);
      again.focus();
      again.setSelectionRange(again.value.length, again.value.length);
    }
  }

  // ---------------------------------------------------------------- one address

  async function addressPage(address) {
    const [detail, doc, history] = await Promise.all([
      getJSON("/addresses/" + encodeURIComponent(address)),
      getJSON("/positions/" + encodeURIComponent(address)),
      getJSON("/addresses/" + encodeURIComponent(address) + "/history"),
    ]);
    if (state.route !== "address") return;
    if (!detail.ok) return show(h("h1", {}, "Address"), message("error", (detail.body && detail.body.error) || "not found"));
    const d = detail.body;
    const positions = doc.ok ? Object.values(doc.body.dexes || {}).flatMap((dex) => Object.values(dex.positions || {})) : [];
    const spot = doc.ok ? Object.values(doc.body.spot || {}) : [];
    const wm = d.watermark;
    const facts = h("dl", { class: "kv" },
      h("dt", {}, "Address"), h("dd", { class: "addr" }, d.address),
      h("dt", {}, "Tier / state"), h("dd", {}, d.tier + " / " + d.state),
      h("dt", {}, "Priority"), h("dd", {}, d.priority),
      h("dt", {}, "Feed connection"), h("dd", {}, d.connection === null || d.connection === undefined ? "— (not on a precise stream)" : String(d.connection)),
      h("dt", {}, "Watermark"), h("dd", {}, wm ? new Date(wm.time).toLocaleString() + " · tid " + wm.tid : "—"),
      h("dt", {}, "Pending orders"), h("dd", {}, (d.pending_orders || []).length),
      h("dt", {}, "Account value"), h("dd", {}, doc.ok ? usd(doc.body.account_value) : "—"));
    const posTable = positions.length ? h("div", { class: "scroll" }, h("table", { id: "positions" },
      h("thead", {}, h("tr", {}, ["Symbol", "Side", "Size", "Value", "Entry", "Mark", "Lev.", "Liq. px", "Liq. dist.", "uPnL"].map((t, i) => h("th", { class: i > 1 ? "num" : "" }, t)))),
      h("tbody", {}, positions.map((p) => h("tr", {},
        h("td", {}, p.symbol || p.coin), h("td", { class: sideClass(p.size) }, num(p.size) > 0 ? "LONG" : "SHORT"),
        h("td", { class: "num" }, px(p.size)), h("td", { class: "num" }, usd(p.position_value_usd)),
        h("td", { class: "num" }, px(p.entry_px)), h("td", { class: "num" }, px(p.mark_px)),
        h("td", { class: "num" }, p.leverage ? p.leverage + "x " + (p.leverage_type || "") : "—"),
        h("td", { class: "num" }, px(p.liquidation_px)), h("td", { class: "num" }, pct(p.liquidation_distance)),
        h("td", { class: "num " + sideClass(p.unrealized_pnl) }, usd(p.unrealized_pnl))))))) : h("p", { class: "muted" }, "No open positions.");
    const spotTable = spot.length ? h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Token", "Total", "Hold", "Value"].map((t, i) => h("th", { class: i ? "num" : "" }, t)))),
      h("tbody", {}, spot.map((s) => h("tr", {}, h("td", {}, s.coin), h("td", { class: "num" }, px(s.total)), h("td", { class: "num" }, px(s.hold)),
        h("td", { class: "num" }, usd(s.usd_value)))))))
      : h("p", { class: "muted" }, "No spot balances.");
    const valueChart = h("div", { class: "chart", id: "value-chart" });
    const sizeChart = h("div", { class: "chart", id: "size-chart" });
    const signals = (d.last_signals || []).slice().reverse();
    const sigTable = signals.length ? h("div", { class: "scroll" }, h("table", { id: "signals" },
      h("thead", {}, h("tr", {}, ["When", "Direction", "Symbol", "Size", "Price", "Notional"].map((t, i) => h("th", { class: i > 2 ? "num" : "" }, t)))),
      h("tbody", {}, signals.map((s) => h("tr", {},
        h("td", {}, ago(s.last_fill_time)), h("td", { class: dirClass(s.dir) }, s.dir), h("td", {}, s.symbol),
        h("td", { class: "num" }, px(s.size)), h("td", { class: "num" }, px(s.price)), h("td", { class: "num" }, usd(s.notional_usd)))))))
      : h("p", { class: "muted" }, "No stored signals.");
    const fills = state.fills.filter((f) => f.address === address);
    const fillTable = fills.length ? h("div", { class: "scroll" }, h("table", { id: "fills" },
      h("thead", {}, h("tr", {}, ["When", "Direction", "Symbol", "Size", "Price", "Notional"].map((t, i) => h("th", { class: i > 2 ? "num" : "" }, t)))),
      h("tbody", {}, fills.map((f) => h("tr", { "data-fill-id": f.fill_id },
        h("td", {}, ago(f.time)), h("td", { class: dirClass(f.dir) }, f.dir), h("td", {}, f.symbol),
        h("td", { class: "num" }, px(f.sz)), h("td", { class: "num" }, px(f.px)), h("td", { class: "num" }, usd(num(f.px) * num(f.sz))))))))
      : h("p", { class: "muted" }, "No fills since this tab opened.");
    show(h("h1", {}, d.label || short(d.address)),
      h("div", { class: "grid" }, h("section", { class: "panel" }, h("h2", {}, "Feed"), facts),
        h("section", { class: "panel" }, h("h2", {}, "Account value"), valueChart),
        h("section", { class: "panel" }, h("h2", {}, "Position sizes"), sizeChart)),
      h("section", { class: "panel" }, h("h2", {}, "Positions"), posTable),
      h("section", { class: "panel" }, h("h2", {}, "Spot balances"), spotTable),
      h("section", { class: "panel" }, h("h2", {}, "Last signals"), sigTable),
      state.config.fills ? h("section", { class: "panel" }, h("h2", {}, "Fills (live)"), fillTable) : null);
    // Drawn once in the page: the charts take the width their panel has.
    const hist = history.ok ? history.body : { sizes: {}, account_value: [] };
    HLChart.lines(valueChart, [{ name: "account value (USD)", points: hist.account_value.map(([t, v]) => [t, Number(v)]) }],
      { empty: "No account value seen yet." });
    HLChart.lines(sizeChart, Object.entries(hist.sizes).map(([sym, pts]) => ({ name: sym, points: pts.map(([t, v]) => [t, Number(v)]) })),
      { step: true, empty: "No stored position changes yet." });
  }

  // ---------------------------------------------------------------- live feed

  function remember(id) {
    if (state.seen.has(id)) return false;
    state.seen.add(id);
    state.seenOrder.push(id);
    if (state.seenOrder.length > SEEN_MAX) state.seen.delete(state.seenOrder.shift());
    return true;
  }
  // A fill's side is the side of the position it trades (its dir: "Open Long", "Close Short", …).
  function sideOf(item) { return item.kind === "fill" ? (/Long/.test(item.dir) ? "LONG" : /Short/.test(item.dir) ? "SHORT" : "") : item.side; }
  function notionalOf(item) { return item.kind === "fill" ? num(item.px) * num(item.sz) : num(item.notional_usd); }
  function matches(s) {
    const f = state.filters;
    if (f.address && !(s.address.includes(f.address.toLowerCase()) || (s.label || "").toLowerCase().includes(f.address.toLowerCase()))) return false;
    if (f.symbol && !(s.symbol.toLowerCase().includes(f.symbol.toLowerCase()) || s.coin.toLowerCase().includes(f.symbol.toLowerCase()))) return false;
    if (f.direction === "long" && sideOf(s) !== "LONG") return false;
    if (f.direction === "short" && sideOf(s) !== "SHORT") return false;
    if (f.min && notionalOf(s) < num(f.min)) return false;
    return true;
  }
  function feedItem(s) {
    if (s.kind === "fill") {
      return h("li", { "data-fill-id": s.fill_id, class: "fill" },
        h("span", { class: "muted" }, new Date(s.time).toLocaleTimeString()),
        addressLink(s.address, short(s.address)),
        h("span", { class: "tag" }, "fill"), h("strong", { class: dirClass(s.dir) }, s.dir),
        h("span", {}, s.symbol), h("span", {}, px(s.sz) + " @ " + px(s.px)), h("span", {}, usd(notionalOf(s))));
    }
    return h("li", { "data-signal-id": s.signal_id },
      h("span", { class: "muted" }, new Date(s.time).toLocaleTimeString()),
      addressLink(s.address, s.label || short(s.address)),
      h("strong", { class: dirClass(s.dir) }, s.dir),
      h("span", {}, s.symbol), h("span", {}, px(s.size) + " @ " + px(s.price)), h("span", {}, usd(s.notional_usd)));
  }
  function pushFeed(item) {
    state.feed.unshift(item);
    if (state.feed.length > FEED_MAX) state.feed.length = FEED_MAX;
    if (state.route === "live") drawFeed();
  }
  function drawFeed() {
    const list = document.getElementById("feed");
    if (!list) return;
    const rows = state.feed.filter(matches);
    list.replaceChildren(...rows.map(feedItem));
    const empty = document.getElementById("feed-empty");
    if (empty) empty.hidden = rows.length > 0;
  }
  function livePage() {
    const f = state.filters;
    const input = (key, placeholder, type) => h("input", { placeholder, value: f[key], type: type || "text", "aria-label": placeholder, id: "filter-" + key,
      oninput: (e) => { f[key] = e.target.value; drawFeed(); } });
    const dir = h("select", { id: "filter-direction", "aria-label": "direction", onchange: (e) => { f.direction = e.target.value; drawFeed(); } },
      h("option", { value: "" }, "any direction"), h("option", { value: "long" }, "long side"), h("option", { value: "short" }, "short side"));
    dir.value = f.direction;
    show(h("h1", {}, state.config.fills ? "Live signals and fills" : "Live signals"),
      h("div", { class: "filters" }, input("address", "address or label"), input("symbol", "symbol"), dir, input("min", "min notional USD", "number")),
      h("section", { class: "panel" }, h("p", { id: "feed-empty", class: "muted" }, (state.config.fills ? "Waiting for signals and fills" : "Waiting for signals") + "… (newest on top; the last " + FEED_MAX + " are kept)"),
        h("ul", { class: "feed", id: "feed" })));
    drawFeed();
  }

  function connect() {
    const dot = document.getElementById("stream");
    const source = new EventSource("/ui/events");
    source.onopen = () => { dot.className = "dot green"; dot.title = "live feed: connected"; };
    source.onerror = () => { dot.className = "dot amber"; dot.title = "live feed: reconnecting"; };
    source.addEventListener("signal", (e) => {
      const s = JSON.parse(e.data);
      if (!remember("signal:" + s.signal_id)) return;
      s.kind = "signal";
      pushFeed(s);
    });
    source.addEventListener("fill", (e) => {
      const f = JSON.parse(e.data);
      if (!remember("fill:" + f.fill_id)) return;
      f.kind = "fill";
      state.fills.unshift(f);
      if (state.fills.length > FEED_MAX) state.fills.length = FEED_MAX;
      pushFeed(f);
      redrawSoon(f.address);
    });
    source.addEventListener("position", (e) => {
      const p = JSON.parse(e.data);
      if (!remember("position:" + p.event_id)) return;
      redrawSoon(p.address);
    });
    source.addEventListener("addresses", () => {
      const refresh = () => {
        if (state.route === "admin") loadAdminList();
        else if (state.route === "whales") whalesPage();
        else if (state.route === "address" && currentAddress()) addressPage(currentAddress());
      };
      refresh();
      setTimeout(refresh, BOOK_SETTLE_MS); // the watched set applies a stored change within a second
    });
  }

  // ---------------------------------------------------------------- market

  async function marketPage() {
    const [sum, disc] = await Promise.all([getJSON("/positions/summary"), getJSON("/discovery")]);
    if (state.route !== "market") return;
    const chart = h("div", { class: "chart", id: "bias-chart" });
    const rows = sum.ok ? sum.body.symbols : [];
    const table = rows.length ? h("div", { class: "scroll" }, h("table", { id: "summary" },
      h("thead", {}, h("tr", {}, ["Symbol", "Longs", "Shorts", "Long USD", "Short USD", "Avg long entry", "Avg short entry", "Closest liquidation"].map((t, i) => h("th", { class: i > 0 && i < 7 ? "num" : "" }, t)))),
      h("tbody", {}, rows.map((r) => {
        const c = r.closest_liquidation;
        return h("tr", {}, h("td", {}, r.symbol), h("td", { class: "num" }, r.longs), h("td", { class: "num" }, r.shorts),
          h("td", { class: "num long" }, usd(r.long_notional_usd)), h("td", { class: "num short" }, usd(r.short_notional_usd)),
          h("td", { class: "num" }, px(r.long_avg_entry_px)), h("td", { class: "num" }, px(r.short_avg_entry_px)),
          h("td", {}, c ? [addressLink(c.address, c.label || short(c.address)), " " + pct(c.liquidation_distance)] : "—"));
      })))) : null;
    show(h("h1", {}, "Market"),
      h("section", { class: "panel" }, h("h2", {}, "Whale bias by symbol (notional)"), chart, table),
      h("section", { class: "panel" }, h("h2", {}, "Discovery candidates"), discovery(disc)));
    HLChart.bias(chart, rows.slice(0, 20).map((r) => ({
      label: r.symbol, long: num(r.long_notional_usd) || 0, short: num(r.short_notional_usd) || 0,
      net: num(r.net_notional_usd) || 0,
    })), { empty: sum.status === 404 ? "Positions are switched off on this service." : "No whale positions yet." });
  }
  function discovery(res) {
    if (res.status === 404) return h("p", { class: "muted", id: "discovery-off" }, "Discovery is not available on this service.");
    if (!res.ok) return message("error", "Could not load discovery: " + ((res.body && res.body.error) || res.status));
    const list = Array.isArray(res.body) ? res.body : res.body.candidates || [];
    if (!list.length) return h("p", { class: "muted" }, "No candidates yet.");
    const cols = Object.keys(list[0]).filter((k) => k !== "address" && typeof list[0][k] !== "object").slice(0, 5);
    const canWatch = state.config.admin && token();
    return h("div", { class: "scroll" }, h("table", { id: "discovery" },
      h("thead", {}, h("tr", {}, h("th", {}, "Address"), cols.map((c) => h("th", {}, c.replace(/_/g, " "))), canWatch ? h("th", {}, "") : null)),
      h("tbody", {}, list.map((c) => h("tr", {}, h("td", { class: "addr" }, c.address), cols.map((k) => h("td", {}, c[k] === null ? "—" : String(c[k]))),
        canWatch ? h("td", {}, h("button", { onclick: async (e) => {
          // The discovery route labels it `discovered:<label>`, watches it wide and refuses one already watched.
          const res = await admin("POST", "/admin/discovery/" + c.address + "/watch");
          e.target.replaceWith(res.ok ? "watching" : message("error", (res.body && res.body.error) || "failed (" + res.status + ")"));
        } }, "Watch")) : null)))));
  }

  // ---------------------------------------------------------------- administration

  function adminPage() {
    if (!state.config.admin) {
      return show(h("h1", {}, "Administration"), h("p", { class: "muted", id: "read-only" },
        "The console is read-only: " + (state.config.read_only_reason || "no admin token is configured, or ui.read_only is set.")));
    }
    if (!token()) {
      const field = h("input", { type: "password", id: "token", autocomplete: "off", placeholder: "admin token", "aria-label": "admin token" });
      const out = h("div");
      const form = h("form", { class: "form-row", onsubmit: async (e) => {
        e.preventDefault();
        sessionStorage.setItem(TOKEN_KEY, field.value.trim());
        const res = await admin("GET", "/admin/addresses");
        if (res.ok) return adminPage();
        sessionStorage.removeItem(TOKEN_KEY);
        out.replaceChildren(message("error", (res.body && res.body.error) || "refused (" + res.status + ")"));
      } }, field, h("button", { type: "submit" }, "Unlock"));
      return show(h("h1", {}, "Administration"), h("p", { class: "muted" }, "Enter the admin token (kept for this tab only)."), form, out);
    }
    const out = h("div", { id: "admin-msg" });
    const fields = {
      address: h("input", { id: "new-address", placeholder: "0x…", size: 44, required: true }),
      label: h("input", { id: "new-label", placeholder: "label", maxlength: 64 }),
      tier: h("select", { id: "new-tier" }, ["auto", "precise", "wide"].map((t) => h("option", { value: t }, t))),
      priority: h("input", { id: "new-priority", type: "number", min: 0, placeholder: "priority" }),
      "min notional": h("input", { id: "new-min", placeholder: "USD" }),
    };
    const say = (res, ok) => out.replaceChildren(res.ok ? message("ok", ok) : message("error", (res.body && res.body.error) || "failed (" + res.status + ")"));
    const add = h("form", { class: "form-row", id: "add-form", onsubmit: async (e) => {
      e.preventDefault();
      const body = { address: fields.address.value.trim(), tier: fields.tier.value };
      if (fields.label.value) body.label = fields.label.value;
      if (fields.priority.value) body.priority = Number(fields.priority.value);
      if (fields["min notional"].value) body.min_notional_usd = fields["min notional"].value;
      const res = await admin("POST", "/admin/addresses", body);
      say(res, "Saved " + body.address);
      if (res.ok) { fields.address.value = ""; fields.label.value = ""; loadAdminList(); }
    } }, ...Object.entries(fields).map(([k, f]) => h("label", {}, k, f)), h("button", { type: "submit", id: "add-button" }, "Add / update"));
    const bulk = h("textarea", { id: "bulk", placeholder: "one address per line, optionally followed by a comma and a label" });
    const importForm = h("form", { onsubmit: async (e) => {
      e.preventDefault();
      const entries = bulk.value.split("\n").map((l) => l.trim()).filter(Boolean).map((l) => {
        const [address, ...rest] = l.split(",");
        const entry = { address: address.trim() };
        if (rest.length) entry.label = rest.join(",").trim();
        return entry;
      });
      if (!entries.length) return;
      const res = await admin("POST", "/admin/addresses", entries);
      say(res, "Imported " + entries.length + " addresses");
      if (res.ok) { bulk.value = ""; loadAdminList(); }
    } }, bulk, h("div", { class: "form-row" }, h("button", { type: "submit" }, "Import")));
    const lock = h("button", { class: "secondary small", onclick: () => { sessionStorage.removeItem(TOKEN_KEY); adminPage(); } }, "Lock");
    show(h("h1", {}, "Administration ", lock), out,
      h("section", { class: "panel" }, h("h2", {}, "Add or update an address"), add),
      h("section", { class: "panel" }, h("h2", {}, "Bulk import"), importForm),
      h("section", { class: "panel" }, h("h2", {}, "Watched addresses"), h("div", { class: "scroll", id: "admin-list" })));
    loadAdminList();
  }

  async function loadAdminList() {
    const holder = document.getElementById("admin-list");
    if (!holder) return;
    const res = await admin("GET", "/admin/addresses");
    if (!res.ok) return holder.replaceChildren(message("error", (res.body && res.body.error) || String(res.status)));
    const out = document.getElementById("admin-msg");
    const say = (r, ok) => out.replaceChildren(r.ok ? message("ok", ok) : message("error", (r.body && r.body.error) || "failed (" + r.status + ")"));
    // A row the operator is editing keeps its inputs when a change made elsewhere redraws the table.
    const editing = new Map([...holder.querySelectorAll("tr.editing")].map((tr) => [tr.dataset.address, tr]));
    holder.replaceChildren(h("table", { id: "admin-table" },
      h("thead", {}, h("tr", {}, ["Address", "Label", "Tier", "Priority", "Active", "Min notional", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, res.body.addresses.map((row) => {
        if (editing.has(row.address)) return editing.get(row.address);
        const label = h("input", { value: row.label || "", maxlength: 64, "aria-label": "label" });
        const tier = h("select", { "aria-label": "tier" }, ["auto", "precise", "wide"].map((t) => h("option", { value: t }, t)));
        tier.value = row.tier;
        const priority = h("input", { type: "number", min: 0, value: row.priority, "aria-label": "priority", class: "narrow" });
        const active = h("input", { type: "checkbox", "aria-label": "active" });
        active.checked = row.is_active !== false;
        const min = h("input", { value: row.min_notional_usd === null || row.min_notional_usd === undefined ? "" : row.min_notional_usd, "aria-label": "min notional" });
        const save = h("button", { onclick: async () => {
          const patch = { label: label.value, tier: tier.value, priority: Number(priority.value), is_active: active.checked };
          if (min.value !== "") patch.min_notional_usd = min.value;
          const r = await admin("PATCH", "/admin/addresses/" + row.address, patch);
          say(r, "Updated " + row.address);
          if (r.ok) tr.classList.remove("editing");
        } }, "Save");
        const remove = h("button", { class: "danger", onclick: async () => {
          if (!confirm("Stop watching " + row.address + "?")) return;
          const r = await admin("DELETE", "/admin/addresses/" + row.address);
          say(r, "Removed " + row.address);
          if (r.ok) loadAdminList();
        } }, "Remove");
        const edited = () => tr.classList.add("editing");
        const tr = h("tr", { "data-address": row.address, oninput: edited, onchange: edited }, h("td", { class: "addr" }, row.address),
          h("td", {}, label), h("td", {}, tier), h("td", {}, priority), h("td", {}, active), h("td", {}, min), h("td", {}, save, " ", remove));
        return tr;
      }))));
  }

  // ---------------------------------------------------------------- start

  async function start() {
    const cfg = await getJSON("/ui/config.json");
    if (cfg.ok) state.config = cfg.body;
    window.addEventListener("hashchange", route);
    connect();
    route();
  }
  start();
})();
