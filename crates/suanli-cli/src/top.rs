//! `suanli top`: the operator's live picture of the fleet in a terminal, for a server without a
//! browser. One screen shows the fleet summary against the district's marks, utilisation by
//! accelerator model and by region, the pools (those that are not healthy first, then by the
//! chosen order, as many as fit), the queue with its head, and the tenants' usage against their
//! quotas.
//!
//! The screen is a pure function of the figures last fetched and the terminal's size
//! ([`render`]), so what it shows is tested without a terminal. Around it, [`run`] fetches over
//! the operator API every interval and draws with crossterm on the alternate screen in raw mode;
//! the terminal is restored on every way out (a key, a signal, an error, a panic). When the
//! broker cannot be reached the screen says so, with the error, above the last figures it had,
//! and keeps trying. Without a terminal on stdout, or with `--once`, one frame is printed as
//! plain text: that is what scripts read.

use std::cmp::{Ordering, Reverse};
use std::fmt;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{self, AtomicBool};
use std::time::Duration;

use clap::{Args, ValueEnum};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::style::{Attribute, Color, Print, ResetColor, SetAttribute, SetForegroundColor};
use crossterm::{cursor, execute, queue, terminal};
use suanli_core::TFLOPS_PER_P;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::{
    FleetSummary, GetFleetSummaryRequest, KeyedUtilisation, ListPoolsRequest, ListQueueRequest,
    ListTenantsRequest, Pool, PoolHealth, Request, Tenant, Utilisation,
};
use tonic::{Code, Status};

use crate::client::{self, Authed, GlobalArgs, PageArgs};
use crate::output::{self, Table, p, pct};
use crate::time::now_unix_ms;

/// The district's milestones for schedulable capacity: more than 10000P at the end of 2024,
/// 20000P as the 2025 target (DESIGN.md). The broker's own configured target is shown as well
/// when it is neither.
const MARKS_P: [(u64, &str); 2] = [(10_000, "end of 2024"), (20_000, "2025 target")];
/// How long one refresh may take before the broker counts as unreachable: a broker that
/// accepts connections but does not answer must not freeze the screen on old figures.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Queued requests fetched for the head of the queue: more rows than a screen has.
const QUEUE_HEAD: u32 = 200;
/// Page size for pools and tenants: the broker's largest, so 140+ pools take one call.
const PAGE_SIZE: u32 = 1000;
/// Width assumed for plain text when neither a terminal nor `COLUMNS` tells it.
const PLAIN_WIDTH: usize = 120;
/// Narrowest bar worth drawing (brackets included) and the widest one drawn.
const MIN_BAR: usize = 7;
const MAX_BAR: usize = 32;
/// Columns between two tables side by side.
const GAP: usize = 3;

// ---------------------------------------------------------------------------------------------
// Arguments

/// `suanli top`.
#[derive(Args, Clone, Debug)]
pub struct TopArgs {
    /// Time between refreshes, in seconds (2, 0.5) or with a unit (500ms, 1m).
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print one frame as plain text and exit, as happens when stdout is not a terminal. The
    /// exit code is 1 when the broker could not be reached or refused the call: the frame then
    /// shows the error, and so does stderr.
    #[arg(long)]
    pub once: bool,
    /// Order of the pool table after the pools that are not healthy, which always come first.
    #[arg(long, value_enum, default_value_t = SortKey::Util)]
    pub sort: SortKey,
}

/// The order of the pool table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Busiest first: the largest share of capacity allocated.
    Util,
    /// Most free capacity first.
    Free,
    /// Largest capacity first.
    Capacity,
    /// Shortest round trip from the district first.
    Rtt,
    /// By pool id.
    Name,
}

impl SortKey {
    /// The next order, for the `s` key.
    fn next(self) -> Self {
        match self {
            SortKey::Util => SortKey::Free,
            SortKey::Free => SortKey::Capacity,
            SortKey::Capacity => SortKey::Rtt,
            SortKey::Rtt => SortKey::Name,
            SortKey::Name => SortKey::Util,
        }
    }

    /// The name `--sort` takes.
    fn name(self) -> &'static str {
        match self {
            SortKey::Util => "util",
            SortKey::Free => "free",
            SortKey::Capacity => "capacity",
            SortKey::Rtt => "rtt",
            SortKey::Name => "name",
        }
    }

    /// The order in words, for the pool table's title.
    fn words(self) -> &'static str {
        match self {
            SortKey::Util => "busiest",
            SortKey::Free => "most free",
            SortKey::Capacity => "largest",
            SortKey::Rtt => "nearest",
            SortKey::Name => "by id",
        }
    }
}

/// `--interval`: seconds as a number, or a duration with a unit; from 0.1 s to a day.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let ms = match text.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() => (secs * 1000.0).round(),
        Ok(_) => return Err("not a number of seconds".into()),
        Err(_) => crate::parse::duration_ms(text)
            .map_err(|e| format!("{e}; or a number of seconds such as 2 or 0.5"))?
            as f64,
    };
    if !(100.0..=86_400_000.0).contains(&ms) {
        return Err("must be from 0.1 s to one day".into());
    }
    Ok(Duration::from_millis(ms as u64))
}

// ---------------------------------------------------------------------------------------------
// Fetching

/// What one refresh fetched.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Totals, breakdowns, pool counts and the queue's counts.
    pub fleet: FleetSummary,
    /// Every pool.
    pub pools: Vec<Pool>,
    /// The head of the queue, in queue order.
    pub queue_head: Vec<Request>,
    /// Every tenant.
    pub tenants: Vec<Tenant>,
}

/// A refresh that failed: what the screen says about it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The broker could not be reached (no connection, or no answer in time), as opposed to an
    /// answer that refused the call.
    pub unreachable: bool,
    /// The error, on one line.
    pub error: String,
    /// When the refreshes started failing.
    pub since_unix_ms: u64,
}

/// The broker took longer than [`FETCH_TIMEOUT`] to answer.
#[derive(Debug)]
struct NoAnswer;

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no answer from the broker within {}",
            output::duration(FETCH_TIMEOUT.as_millis() as u64)
        )
    }
}

impl std::error::Error for NoAnswer {}

/// Whether an error means the broker was not reached, rather than that it refused.
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.is::<tonic::transport::Error>()
            || cause.is::<NoAnswer>()
            || cause
                .downcast_ref::<Status>()
                .is_some_and(|s| matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded))
    })
}

/// Fetches the figures, keeping the connection between refreshes and opening a new one after a
/// failure.
struct Fetcher<'a> {
    g: &'a GlobalArgs,
    client: Option<OperatorServiceClient<Authed>>,
}

impl<'a> Fetcher<'a> {
    fn new(g: &'a GlobalArgs) -> Self {
        Fetcher { g, client: None }
    }

    async fn fetch(&mut self) -> anyhow::Result<Snapshot> {
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch_now()).await {
            Ok(result) => result,
            Err(_) => Err(NoAnswer.into()),
        };
        if result.is_err() {
            self.client = None;
        }
        result
    }

    async fn fetch_now(&mut self) -> anyhow::Result<Snapshot> {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                let c = client::operator_client(self.g).await?;
                self.client = Some(c.clone());
                c
            }
        };
        Ok(fetch(&client).await?)
    }
}

/// The four calls of one refresh, at the same time.
async fn fetch(client: &OperatorServiceClient<Authed>) -> Result<Snapshot, Status> {
    let all = PageArgs {
        all_pages: true,
        page_size: PAGE_SIZE,
        ..Default::default()
    };
    let fleet = async {
        let mut c = client.clone();
        Ok(c.get_fleet_summary(GetFleetSummaryRequest {})
            .await?
            .into_inner())
    };
    let pools = all.collect(|page_size, page_token| {
        let mut c = client.clone();
        async move {
            let page = c
                .list_pools(ListPoolsRequest {
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.pools, page.next_page_token))
        }
    });
    let queue = async {
        let mut c = client.clone();
        let page = c
            .list_queue(ListQueueRequest {
                page_size: QUEUE_HEAD,
                page_token: String::new(),
                priorities: Vec::new(),
            })
            .await?
            .into_inner();
        Ok(page.requests)
    };
    let tenants = all.collect(|page_size, page_token| {
        let mut c = client.clone();
        async move {
            let page = c
                .list_tenants(ListTenantsRequest {
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.tenants, page.next_page_token))
        }
    });
    let (fleet, (pools, _), queue_head, (tenants, _)) =
        tokio::try_join!(fleet, pools, queue, tenants)?;
    Ok(Snapshot {
        fleet,
        pools,
        queue_head,
        tenants,
    })
}

/// What the screen knows: the last figures fetched and whether the last refresh failed.
#[derive(Debug, Default)]
struct State {
    data: Option<(Snapshot, u64)>,
    failure: Option<Failure>,
}

impl State {
    /// Takes a refresh's outcome; hands its error back.
    fn update(&mut self, result: anyhow::Result<Snapshot>, now: u64) -> anyhow::Result<()> {
        match result {
            Ok(s) => {
                self.data = Some((s, now));
                self.failure = None;
                Ok(())
            }
            Err(e) => {
                let since = self.failure.as_ref().map_or(now, |f| f.since_unix_ms);
                self.failure = Some(Failure {
                    unreachable: is_unreachable(&e),
                    error: client::error_line(&e),
                    since_unix_ms: since,
                });
                Err(e)
            }
        }
    }

    fn view<'a>(&'a self, g: &'a GlobalArgs, a: &TopArgs, sort: SortKey, live: bool) -> View<'a> {
        View {
            addr: &g.addr,
            interval: a.interval,
            sort,
            live,
            now_unix_ms: now_unix_ms(),
            data: self.data.as_ref().map(|(s, at)| (s, *at)),
            failure: self.failure.as_ref(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The frame

/// Everything a frame is drawn from.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The broker's address, as given.
    pub addr: &'a str,
    /// Time between refreshes.
    pub interval: Duration,
    /// Order of the pool table.
    pub sort: SortKey,
    /// Drawn on a live screen (which has keys to tell about), not printed once.
    pub live: bool,
    /// Now, by this machine's clock: how old the figures are.
    pub now_unix_ms: u64,
    /// The last figures fetched and when, by this machine's clock.
    pub data: Option<(&'a Snapshot, u64)>,
    /// Why the last refresh failed, if it did.
    pub failure: Option<&'a Failure>,
}

/// The room a frame has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    /// Characters per line.
    pub width: usize,
    /// Lines; `None` for no limit (plain text to a file or a pipe).
    pub height: Option<usize>,
}

/// How a line is drawn on a terminal; plain text ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Ordinary text.
    Plain,
    /// A section's heading or a table's header.
    Heading,
    /// Something that needs the operator's attention (a pool that is not healthy).
    Warn,
    /// The broker is unreachable or refused.
    Alert,
}

/// One line of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The text, at most the frame's width.
    pub text: String,
    /// How it is drawn.
    pub style: Style,
}

impl Line {
    fn new(text: impl Into<String>, style: Style) -> Self {
        Line {
            text: text.into(),
            style,
        }
    }
}

/// A screenful: at most the height's lines, each at most the width's characters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// The lines, top to bottom.
    pub lines: Vec<Line>,
}

impl Frame {
    /// The frame as plain text, one line each, with no escape codes.
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("{}\n", l.text.trim_end()))
            .collect()
    }
}

/// A utilisation bar of exactly `width` characters (brackets included): `[####......]`, full
/// when `part` reaches `whole` (or exceeds it, as a tenant borrowing beyond its quota does).
pub fn bar(part: u64, whole: u64, width: usize) -> String {
    // Too narrow for brackets: the fill alone.
    let brackets = width >= 3;
    let inner = if brackets { width - 2 } else { width };
    let filled = if whole == 0 {
        0
    } else {
        let exact = (u128::from(part) * inner as u128 + u128::from(whole) / 2) / u128::from(whole);
        usize::try_from(exact).unwrap_or(inner).min(inner)
    };
    let mut out = String::with_capacity(width);
    if brackets {
        out.push('[');
    }
    out.extend(std::iter::repeat_n('#', filled));
    out.extend(std::iter::repeat_n('.', inner - filled));
    if brackets {
        out.push(']');
    }
    out
}

/// The first `width` characters of `text`.
fn fit(text: &str, width: usize) -> String {
    text.chars().take(width).collect()
}

/// `text` in lines of at most `width` characters, broken at spaces where it can be, at most
/// `max` of them.
fn wrap(text: &str, width: usize, max: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        let len = line.chars().count();
        if len > 0 && len + 1 + word.len() <= width {
            line.push(' ');
            line.extend(&word);
            continue;
        }
        if len > 0 {
            lines.push(std::mem::take(&mut line));
        }
        // A word longer than a line is cut where the line ends.
        while word.len() > width {
            lines.push(word.drain(..width).collect());
        }
        line.extend(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines.truncate(max);
    lines
}

/// A row of a table with a utilisation bar.
struct BarRow {
    cells: Vec<String>,
    part: u64,
    whole: u64,
}

/// A table with a bar column inserted at `bar_at`, as wide as the room left in `width` allows
/// (none when too narrow). Returns the header line and the row lines.
fn bar_table(
    columns: &[&'static str],
    bar_at: usize,
    rows: &[BarRow],
    width: usize,
) -> (String, Vec<String>) {
    let mut plain = Table::new(columns);
    for r in rows {
        plain.row(r.cells.clone());
    }
    let text = plain.render();
    let natural = text.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    let room = width.saturating_sub(natural + 2);
    let text = if room < MIN_BAR {
        text
    } else {
        let mut cols = columns.to_vec();
        cols.insert(bar_at.min(cols.len()), "");
        let mut t = Table::new(&cols);
        for r in rows {
            let mut cells = r.cells.clone();
            cells.insert(
                bar_at.min(r.cells.len()),
                bar(r.part, r.whole, room.min(MAX_BAR)),
            );
            t.row(cells);
        }
        t.render()
    };
    let mut lines = text.lines().map(String::from);
    let header = lines.next().unwrap_or_default();
    (header, lines.collect())
}

/// A part of the screen that can be cut short: heading lines, then rows, then a line saying how
/// many rows did not fit.
struct Block {
    head: Vec<Line>,
    rows: Vec<Line>,
    /// Items in all: more than `rows` when only some were fetched (the head of the queue).
    total: usize,
    /// What the rows are, for the `... N more` line.
    noun: &'static str,
    /// Rows it shows at least, when it is shown at all.
    min_rows: usize,
}

impl Block {
    fn new(head: Vec<Line>, rows: Vec<Line>, noun: &'static str, min_rows: usize) -> Self {
        let total = rows.len();
        Block {
            head,
            rows,
            total,
            noun,
            min_rows,
        }
    }

    fn want(&self) -> usize {
        self.head.len() + self.rows.len() + usize::from(self.total > self.rows.len())
    }

    fn min(&self) -> usize {
        let shown = self.min_rows.min(self.rows.len());
        self.head.len() + shown + usize::from(shown < self.total)
    }

    /// The block in at most `budget` lines: nothing when not even its heading and one more line
    /// fit.
    fn lines(&self, budget: usize) -> Vec<Line> {
        if budget >= self.want() {
            let mut out = self.head.clone();
            out.extend(self.rows.iter().cloned());
            if self.total > self.rows.len() {
                out.push(self.more(self.rows.len()));
            }
            return out;
        }
        if budget <= self.head.len() {
            return Vec::new();
        }
        let shown = budget - self.head.len() - 1;
        let mut out = self.head.clone();
        out.extend(self.rows[..shown].iter().cloned());
        out.push(self.more(shown));
        out
    }

    fn more(&self, shown: usize) -> Line {
        Line::new(
            format!("... {} more {}", self.total - shown, self.noun),
            Style::Plain,
        )
    }
}

/// One block, or two side by side (the left one padded to `left_width`).
enum Body {
    One(Block),
    Pair(Block, Block, usize),
}

/// A section of the screen and how it shares the height.
struct Section {
    body: Body,
    /// Sections get their minimum in this order (lowest first) while there is room.
    rank: u8,
    /// Lines it gets before the filling section takes the rest.
    cap: usize,
    /// Takes whatever height is left (the pool table).
    fill: bool,
}

impl Section {
    fn want(&self) -> usize {
        match &self.body {
            Body::One(b) => b.want(),
            Body::Pair(l, r, _) => l.want().max(r.want()),
        }
    }

    fn min(&self) -> usize {
        match &self.body {
            Body::One(b) => b.min(),
            Body::Pair(l, r, _) => l.min().max(r.min()),
        }
    }

    fn lines(&self, budget: usize) -> Vec<Line> {
        match &self.body {
            Body::One(b) => b.lines(budget),
            Body::Pair(l, r, left_width) => {
                let (left, right) = (l.lines(budget), r.lines(budget));
                (0..left.len().max(right.len()))
                    .map(|i| {
                        let a = left.get(i);
                        let text = a.map_or("", |x| x.text.as_str());
                        let pad = left_width.saturating_sub(text.chars().count()) + GAP;
                        let b = right.get(i).map_or("", |x| x.text.as_str());
                        let style = a.or(right.get(i)).map_or(Style::Plain, |x| x.style);
                        Line::new(format!("{text}{}{b}", " ".repeat(pad)), style)
                    })
                    .collect()
            }
        }
    }
}

/// Lines for each section within `budget`: first every section's minimum by rank while it fits,
/// then each section up to its cap, then the filling section up to all it wants, then the rest
/// to whoever wants more.
fn allocate(sections: &[Section], budget: usize) -> Vec<usize> {
    let mut give = vec![0; sections.len()];
    let mut left = budget;
    let mut order: Vec<usize> = (0..sections.len()).collect();
    order.sort_by_key(|&i| sections[i].rank);
    for &i in &order {
        let min = sections[i].min();
        if min <= left {
            give[i] = min;
            left -= min;
        }
    }
    let mut grow = |i: usize, to: usize, give: &mut Vec<usize>| {
        if give[i] > 0 && to > give[i] {
            let add = (to - give[i]).min(left);
            give[i] += add;
            left -= add;
        }
    };
    for &i in &order {
        if !sections[i].fill {
            grow(i, sections[i].cap.min(sections[i].want()), &mut give);
        }
    }
    for &i in &order {
        if sections[i].fill {
            grow(i, sections[i].want(), &mut give);
        }
    }
    for &i in &order {
        grow(i, sections[i].want(), &mut give);
    }
    give
}

/// The frame for `view` in `size`: a pure function of its arguments.
pub fn render(view: &View<'_>, size: Size) -> Frame {
    let width = size.width;
    let mut top = vec![header(view)];
    if let Some(f) = view.failure {
        top.extend(alert(view, f, width));
    }
    let sections = match view.data {
        Some((s, _)) => sections(s, view.sort, width),
        None => Vec::new(),
    };
    let mut lines = top;
    if view.data.is_none() {
        let text = if view.failure.is_some() {
            "No figures yet: the broker has not answered."
        } else {
            "Waiting for the broker's first answer..."
        };
        lines.push(Line::new(text, Style::Plain));
    }
    let height = size.height.unwrap_or(usize::MAX);
    let budget = height.saturating_sub(lines.len());
    let wanted: usize = sections.iter().map(Section::want).sum();
    // Blank lines between sections only when everything fits with them.
    let spaced = wanted.saturating_add(sections.len()) <= budget;
    let give = allocate(
        &sections,
        if spaced {
            budget - sections.len()
        } else {
            budget
        },
    );
    for (section, n) in sections.iter().zip(give) {
        let body = section.lines(n);
        if body.is_empty() {
            continue;
        }
        if spaced {
            lines.push(Line::new("", Style::Plain));
        }
        lines.extend(body);
    }
    lines.truncate(height);
    for l in &mut lines {
        l.text = fit(&l.text, width);
    }
    Frame { lines }
}

fn header(view: &View<'_>) -> Line {
    let at = view
        .data
        .map_or(view.now_unix_ms, |(s, _)| s.fleet.time_unix_ms);
    let mut text = format!(
        "suanli top  {}  {}  every {}  sort {}",
        view.addr,
        output::time(at),
        output::duration(view.interval.as_millis() as u64),
        view.sort.name()
    );
    if view.live {
        text.push_str("  (q quit, s sort, r refresh)");
    }
    Line::new(text, Style::Heading)
}

fn alert(view: &View<'_>, f: &Failure, width: usize) -> Vec<Line> {
    let what = if f.unreachable {
        "BROKER UNREACHABLE"
    } else {
        "BROKER ERROR"
    };
    let mut lines: Vec<Line> = wrap(&format!("{what}: {}", f.error), width, 4)
        .into_iter()
        .map(|t| Line::new(t, Style::Alert))
        .collect();
    let mut status = if view.live {
        format!(
            "failing since {}, retrying every {}",
            output::time(f.since_unix_ms),
            output::duration(view.interval.as_millis() as u64)
        )
    } else {
        format!("failed at {}", output::time(f.since_unix_ms))
    };
    if let Some((_, at)) = view.data {
        status.push_str(&format!(
            "; the figures below are from {}, {} ago",
            output::time(at),
            age(view.now_unix_ms.saturating_sub(at))
        ));
    }
    lines.extend(
        wrap(&status, width, 2)
            .into_iter()
            .map(|t| Line::new(t, Style::Alert)),
    );
    lines
}

/// A time span to the second, as people write it.
fn age(ms: u64) -> String {
    output::duration(ms / 1000 * 1000)
}

fn sections(s: &Snapshot, sort: SortKey, width: usize) -> Vec<Section> {
    let mut out = vec![Section {
        body: Body::One(summary(&s.fleet, s.pools.len(), width)),
        rank: 0,
        cap: usize::MAX,
        fill: false,
    }];
    let model = |w| breakdown("MODEL", &s.fleet.by_model, "models", w);
    let region = |w| breakdown("REGION", &s.fleet.by_region, "regions", w);
    // Side by side when each table and a bar fit in half the width.
    let half = width.saturating_sub(GAP) / 2;
    let natural = |b: &Block| {
        b.head
            .iter()
            .chain(&b.rows)
            .map(|l| l.text.chars().count())
            .max()
            .unwrap_or(0)
    };
    let (bare_model, bare_region) = (model(0), region(0));
    if natural(&bare_model).max(natural(&bare_region)) + 2 + MIN_BAR <= half {
        let left = model(half);
        let left_width = natural(&left);
        out.push(Section {
            body: Body::Pair(left, region(half), left_width),
            rank: 3,
            cap: 10,
            fill: false,
        });
    } else {
        for (b, rank) in [(model(width), 3), (region(width), 4)] {
            out.push(Section {
                body: Body::One(b),
                rank,
                cap: 6,
                fill: false,
            });
        }
    }
    out.push(Section {
        body: Body::One(pools(&s.pools, &s.fleet, sort, width)),
        rank: 1,
        cap: 0,
        fill: true,
    });
    out.push(Section {
        body: Body::One(queue(s)),
        rank: 2,
        cap: 10,
        fill: false,
    });
    out.push(Section {
        body: Body::One(tenants(&s.tenants, width)),
        rank: 5,
        cap: 8,
        fill: false,
    });
    out
}

fn summary(f: &FleetSummary, pool_count: usize, width: usize) -> Block {
    let row = |name: &str, u: Option<&Utilisation>| {
        let u = u.copied().unwrap_or_default();
        BarRow {
            cells: vec![
                name.to_string(),
                p(u.capacity_tflops),
                p(u.allocated_tflops),
                p(u.capacity_tflops.saturating_sub(u.allocated_tflops)),
                pct(u.allocated_tflops, u.capacity_tflops),
            ],
            part: u.allocated_tflops,
            whole: u.capacity_tflops,
        }
    };
    let rows = [
        row("total", f.total.as_ref()),
        row("local", f.local.as_ref()),
        row("external", f.external.as_ref()),
    ];
    let (head, lines) = bar_table(
        &["FLEET", ">CAPACITY P", ">ALLOCATED P", ">FREE P", ">USED %"],
        5,
        &rows,
        width,
    );
    let mut lines: Vec<Line> = lines
        .into_iter()
        .map(|t| Line::new(t, Style::Plain))
        .collect();
    let capacity = f.total.unwrap_or_default().capacity_tflops;
    let mut marks: Vec<String> = MARKS_P
        .iter()
        .map(|&(mark, what)| {
            format!(
                "{mark}P ({what}) {} %",
                pct(capacity, mark.saturating_mul(TFLOPS_PER_P))
            )
        })
        .collect();
    if f.target_tflops > 0
        && !MARKS_P
            .iter()
            .any(|&(mark, _)| mark.saturating_mul(TFLOPS_PER_P) == f.target_tflops)
    {
        marks.push(format!(
            "target {}P {} %",
            output::p_exact(f.target_tflops),
            pct(capacity, f.target_tflops)
        ));
    }
    lines.push(Line::new(
        format!("capacity against  {}", marks.join("   ")),
        Style::Plain,
    ));
    let counts = f.pools.unwrap_or_default();
    lines.push(Line::new(
        format!(
            "pools {pool_count}: {} healthy, {} draining, {} lost   live leases {}   queued {}",
            counts.healthy,
            counts.draining,
            counts.lost,
            f.live_leases,
            f.queue.as_ref().map_or(0, |q| q.length)
        ),
        if counts.draining + counts.lost > 0 {
            Style::Warn
        } else {
            Style::Plain
        },
    ));
    let rows = lines.len();
    Block::new(vec![Line::new(head, Style::Heading)], lines, "", rows)
}

/// Utilisation by one key (model or region), largest first.
fn breakdown(
    first: &'static str,
    rows: &[KeyedUtilisation],
    noun: &'static str,
    width: usize,
) -> Block {
    let mut sorted: Vec<(&str, Utilisation)> = rows
        .iter()
        .map(|k| (k.key.as_str(), k.utilisation.unwrap_or_default()))
        .collect();
    sorted.sort_by(|a, b| {
        b.1.capacity_tflops
            .cmp(&a.1.capacity_tflops)
            .then_with(|| a.0.cmp(b.0))
    });
    let rows: Vec<BarRow> = sorted
        .iter()
        .map(|(key, u)| BarRow {
            cells: vec![
                key.to_string(),
                p(u.capacity_tflops),
                p(u.allocated_tflops),
                pct(u.allocated_tflops, u.capacity_tflops),
            ],
            part: u.allocated_tflops,
            whole: u.capacity_tflops,
        })
        .collect();
    let (head, lines) = bar_table(
        &[first, ">CAPACITY P", ">USED P", ">USED %"],
        4,
        &rows,
        width,
    );
    Block::new(
        vec![Line::new(head, Style::Heading)],
        lines
            .into_iter()
            .map(|t| Line::new(t, Style::Plain))
            .collect(),
        noun,
        3,
    )
}

/// How urgently a pool needs a look: lost (or unknown) first, then draining, then healthy ones
/// with devices out of service, then the rest.
fn attention(pool: &Pool) -> u8 {
    match PoolHealth::try_from(pool.health) {
        Ok(PoolHealth::Healthy) if pool.utilisation.unwrap_or_default().unavailable_devices > 0 => {
            2
        }
        Ok(PoolHealth::Healthy) => 3,
        Ok(PoolHealth::Draining) => 1,
        _ => 0,
    }
}

/// Pools in screen order: those that need a look first, then by `sort`, then by id.
pub fn sort_pools(pools: &mut [&Pool], sort: SortKey) {
    let util = |pool: &Pool| pool.utilisation.unwrap_or_default();
    pools.sort_by(|a, b| {
        let (ua, ub) = (util(a), util(b));
        let by_key = match sort {
            // allocated/capacity, compared without division; an empty pool counts as idle.
            SortKey::Util => {
                let share = |u: &Utilisation| (u.allocated_tflops, u.capacity_tflops.max(1));
                let ((na, da), (nb, db)) = (share(&ua), share(&ub));
                (u128::from(nb) * u128::from(da))
                    .cmp(&(u128::from(na) * u128::from(db)))
                    .then(ub.allocated_tflops.cmp(&ua.allocated_tflops))
            }
            SortKey::Free => {
                let free = |u: &Utilisation| u.capacity_tflops.saturating_sub(u.allocated_tflops);
                free(&ub).cmp(&free(&ua))
            }
            SortKey::Capacity => ub.capacity_tflops.cmp(&ua.capacity_tflops),
            SortKey::Rtt => a.rtt_ms.cmp(&b.rtt_ms),
            SortKey::Name => Ordering::Equal,
        };
        attention(a)
            .cmp(&attention(b))
            .then(by_key)
            .then_with(|| a.id.cmp(&b.id))
    });
}

fn pools(all: &[Pool], f: &FleetSummary, sort: SortKey, width: usize) -> Block {
    let mut sorted: Vec<&Pool> = all.iter().collect();
    sort_pools(&mut sorted, sort);
    let rows: Vec<BarRow> = sorted
        .iter()
        .map(|pool| {
            let u = pool.utilisation.unwrap_or_default();
            let mut health = output::pool_health(pool.health);
            if u.unavailable_devices > 0 {
                health.push_str(&format!(" ({} down)", u.unavailable_devices));
            }
            BarRow {
                cells: vec![
                    pool.id.clone(),
                    health,
                    p(u.capacity_tflops),
                    p(u.allocated_tflops),
                    p(u.capacity_tflops.saturating_sub(u.allocated_tflops)),
                    pct(u.allocated_tflops, u.capacity_tflops),
                    pool.rtt_ms.to_string(),
                    output::pool_kind(pool.kind),
                    pool.region.clone(),
                ],
                part: u.allocated_tflops,
                whole: u.capacity_tflops,
            }
        })
        .collect();
    let (head, lines) = bar_table(
        &[
            "POOL",
            "HEALTH",
            ">CAPACITY P",
            ">USED P",
            ">FREE P",
            ">USED %",
            ">RTT MS",
            "KIND",
            "REGION",
        ],
        6,
        &rows,
        width,
    );
    let counts = f.pools.unwrap_or_default();
    let title = format!(
        "POOLS {}: {} healthy, {} draining, {} lost; not healthy first, then {}",
        all.len(),
        counts.healthy,
        counts.draining,
        counts.lost,
        sort.words()
    );
    let rows = lines
        .into_iter()
        .zip(&sorted)
        .map(|(t, pool)| {
            let style = if attention(pool) < 3 {
                Style::Warn
            } else {
                Style::Plain
            };
            Line::new(t, style)
        })
        .collect();
    Block::new(
        vec![
            Line::new(title, Style::Heading),
            Line::new(head, Style::Heading),
        ],
        rows,
        "pools",
        5,
    )
}

fn queue(s: &Snapshot) -> Block {
    let q = s.fleet.queue.clone().unwrap_or_default();
    let length = (q.length as usize).max(s.queue_head.len());
    if length == 0 {
        return Block::new(
            vec![Line::new("QUEUE empty", Style::Heading)],
            Vec::new(),
            "",
            0,
        );
    }
    let by_priority: Vec<String> = q
        .by_priority
        .iter()
        .map(|c| format!("{} {}", output::priority(c.priority), c.count))
        .collect();
    let by_reason: Vec<String> = q
        .by_reason
        .iter()
        .map(|c| format!("{} {}", output::wait_reason(c.reason), c.count))
        .collect();
    let now = s.fleet.time_unix_ms;
    let mut t = Table::new(&[
        ">POS",
        "TENANT",
        "SIZE",
        "PRIORITY",
        "REASON",
        "EST. START",
        ">ID",
    ]);
    for r in &s.queue_head {
        let spec = r.spec.as_ref();
        let wait = r.wait.unwrap_or_default();
        let start = match wait.earliest_start_unix_ms {
            None => "-".to_string(),
            Some(at) if at <= now => "now".to_string(),
            Some(at) => format!("in {}", age(at - now)),
        };
        t.row(vec![
            wait.position.to_string(),
            r.tenant.clone(),
            output::shape(spec),
            spec.map_or_else(|| "-".to_string(), |s| output::priority(s.priority)),
            output::wait_reason(wait.reason),
            start,
            r.id.to_string(),
        ]);
    }
    let text = t.render();
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut block = Block::new(
        vec![
            Line::new(
                format!("QUEUE {length} waiting: {}", by_priority.join(", ")),
                Style::Heading,
            ),
            Line::new(
                format!("  by reason: {}", by_reason.join(", ")),
                Style::Plain,
            ),
            Line::new(header, Style::Heading),
        ],
        lines.map(|l| Line::new(l, Style::Plain)).collect(),
        "queued requests",
        3,
    );
    block.total = length;
    block
}

fn tenants(all: &[Tenant], width: usize) -> Block {
    let mut sorted: Vec<&Tenant> = all.iter().collect();
    // The heaviest users and those waiting first: they are what a short table must keep.
    sorted.sort_by_key(|t| {
        let u = t.usage.unwrap_or_default();
        (Reverse(u.used_tflops), Reverse(u.queued), t.id.clone())
    });
    let rows: Vec<BarRow> = sorted
        .iter()
        .map(|t| {
            let u = t.usage.unwrap_or_default();
            BarRow {
                cells: vec![
                    t.id.clone(),
                    p(t.quota_tflops),
                    p(u.used_tflops),
                    pct(u.used_tflops, t.quota_tflops),
                    p(u.borrowed_tflops),
                    u.live_leases.to_string(),
                    u.queued.to_string(),
                ],
                part: u.used_tflops,
                whole: t.quota_tflops,
            }
        })
        .collect();
    let (head, lines) = bar_table(
        &[
            "TENANT",
            ">QUOTA P",
            ">USED P",
            ">OF QUOTA %",
            ">BORROWED P",
            ">LEASES",
            ">QUEUED",
        ],
        4,
        &rows,
        width,
    );
    Block::new(
        vec![Line::new(head, Style::Heading)],
        lines
            .into_iter()
            .map(|t| Line::new(t, Style::Plain))
            .collect(),
        "tenants",
        2,
    )
}

// ---------------------------------------------------------------------------------------------
// The shell

/// `suanli top`.
pub async fn run(g: &GlobalArgs, a: &TopArgs) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    if a.once || !tty {
        once(g, a, tty).await
    } else {
        live(g, a).await
    }
}

/// The room for plain text: the terminal's (less the line the prompt takes after it), else
/// `COLUMNS` and `LINES`, else a usual width and no limit on the lines.
fn plain_size(tty: bool) -> Size {
    if tty
        && let Ok((cols, rows)) = terminal::size()
        && cols > 0
        && rows > 1
    {
        return Size {
            width: usize::from(cols),
            height: Some(usize::from(rows) - 1),
        };
    }
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    Size {
        width: env("COLUMNS").unwrap_or(PLAIN_WIDTH),
        height: env("LINES"),
    }
}

async fn once(g: &GlobalArgs, a: &TopArgs, tty: bool) -> anyhow::Result<()> {
    let mut fetcher = Fetcher::new(g);
    let result = fetcher.fetch().await;
    let mut state = State::default();
    let outcome = state.update(result, now_unix_ms());
    let frame = render(&state.view(g, a, a.sort, false), plain_size(tty));
    output::emit(&frame.text());
    outcome
}

/// What a key or a terminal event asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Quit,
    Redraw,
    NextSort,
    Refresh,
}

fn input_of(event: &Event) -> Option<Input> {
    match event {
        Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Input::Quit),
            // Raw mode turns Ctrl-C into a key rather than a signal.
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Some(Input::Quit),
            KeyCode::Char('s' | 'S') => Some(Input::NextSort),
            KeyCode::Char('r' | 'R') => Some(Input::Refresh),
            _ => None,
        },
        Event::Resize(..) => Some(Input::Redraw),
        _ => None,
    }
}

/// Reads the terminal's events on a thread of its own (crossterm's reads block) until stopped.
struct InputThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl InputThread {
    fn spawn(tx: tokio::sync::mpsc::UnboundedSender<std::io::Result<Input>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            // Polling with a timeout lets the thread see `stop` and end before the terminal is
            // restored, so no read races the shell the operator returns to.
            while !stopped.load(atomic::Ordering::Relaxed) {
                let read = match event::poll(Duration::from_millis(100)) {
                    Ok(false) => continue,
                    Ok(true) => event::read(),
                    Err(e) => Err(e),
                };
                let sent = match read {
                    Ok(ev) => match input_of(&ev) {
                        Some(input) => tx.send(Ok(input)),
                        None => Ok(()),
                    },
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        InputThread {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for InputThread {
    fn drop(&mut self) {
        self.stop.store(true, atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Raw mode on the alternate screen, with the cursor hidden, until dropped.
struct Screen {
    colour: bool,
}

impl Screen {
    fn enter() -> anyhow::Result<Self> {
        terminal::enable_raw_mode()?;
        // From here on, dropping the screen restores the terminal.
        let screen = Screen {
            colour: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        };
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }

    fn size() -> Size {
        let (cols, rows) = terminal::size().unwrap_or((80, 24));
        // One column short of the edge: a character in the last cell of the last line may
        // scroll the screen on some terminals.
        Size {
            width: usize::from(cols).saturating_sub(1),
            height: Some(usize::from(rows)),
        }
    }

    fn draw(&self, frame: &Frame) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        queue!(out, terminal::BeginSynchronizedUpdate)?;
        for (i, line) in frame.lines.iter().enumerate() {
            let row = u16::try_from(i).unwrap_or(u16::MAX);
            queue!(out, cursor::MoveTo(0, row))?;
            match (line.style, self.colour) {
                (Style::Plain, _) => {}
                (Style::Heading, _) => queue!(out, SetAttribute(Attribute::Bold))?,
                (Style::Warn, true) => queue!(out, SetForegroundColor(Color::Red))?,
                (Style::Warn, false) => queue!(out, SetAttribute(Attribute::Bold))?,
                (Style::Alert, colour) => {
                    if colour {
                        queue!(out, SetForegroundColor(Color::Red))?;
                    }
                    queue!(
                        out,
                        SetAttribute(Attribute::Reverse),
                        SetAttribute(Attribute::Bold)
                    )?;
                }
            }
            queue!(
                out,
                Print(&line.text),
                SetAttribute(Attribute::Reset),
                ResetColor,
                terminal::Clear(terminal::ClearType::UntilNewLine)
            )?;
        }
        let below = u16::try_from(frame.lines.len()).unwrap_or(u16::MAX);
        queue!(
            out,
            cursor::MoveTo(0, below),
            terminal::Clear(terminal::ClearType::FromCursorDown),
            terminal::EndSynchronizedUpdate
        )?;
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn restore_terminal() {
    let _ = execute!(
        std::io::stdout(),
        ResetColor,
        cursor::Show,
        terminal::LeaveAlternateScreen
    );
    let _ = terminal::disable_raw_mode();
}

/// Waits for the next input; a closed channel (the reader ended) counts as a request to quit.
async fn next_input(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<Input>>,
) -> std::io::Result<Input> {
    rx.recv().await.unwrap_or(Ok(Input::Quit))
}

async fn live(g: &GlobalArgs, a: &TopArgs) -> anyhow::Result<()> {
    // A panic's message would be lost on the alternate screen, and raw mode would outlive it.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
    let screen = Screen::enter()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _input = InputThread::spawn(tx);
    let shutdown = crate::serve::shutdown_signal();
    tokio::pin!(shutdown);
    let mut fetcher = Fetcher::new(g);
    let mut state = State::default();
    let mut sort = a.sort;
    let draw = |state: &State, sort: SortKey| {
        screen.draw(&render(&state.view(g, a, sort, true), Screen::size()))
    };
    loop {
        draw(&state, sort)?;
        let result = {
            let fetch = fetcher.fetch();
            tokio::pin!(fetch);
            loop {
                tokio::select! {
                    result = &mut fetch => break result,
                    input = next_input(&mut rx) => match input? {
                        Input::Quit => return Ok(()),
                        Input::NextSort => {
                            sort = sort.next();
                            draw(&state, sort)?;
                        }
                        Input::Redraw | Input::Refresh => draw(&state, sort)?,
                    },
                    () = &mut shutdown => return Ok(()),
                }
            }
        };
        // A failed refresh is on the screen; the next one may succeed.
        let _ = state.update(result, now_unix_ms());
        draw(&state, sort)?;
        let next = tokio::time::Instant::now() + a.interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                input = next_input(&mut rx) => match input? {
                    Input::Quit => return Ok(()),
                    Input::Refresh => break,
                    Input::NextSort => {
                        sort = sort.next();
                        draw(&state, sort)?;
                    }
                    Input::Redraw => draw(&state, sort)?,
                },
                () = &mut shutdown => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use crossterm::event::KeyEvent;
    use suanli_proto::v1::{
        ElasticShape, GangShape, PoolHealthCounts, PoolKind, Priority, PriorityCount, QueueSummary,
        RequestSpec, TenantUsage, WaitInfo, WaitReason, WaitReasonCount, request_spec::Shape,
    };

    use super::*;

    const T: u64 = TFLOPS_PER_P;
    const NOW: u64 = 1_764_288_000_000;

    fn util(capacity_p: u64, allocated_p: u64) -> Utilisation {
        Utilisation {
            capacity_tflops: capacity_p * T,
            allocated_tflops: allocated_p * T,
            capacity_devices: capacity_p,
            allocated_devices: allocated_p,
            unavailable_devices: 0,
        }
    }

    fn pool(id: &str, health: PoolHealth, capacity_p: u64, allocated_p: u64, rtt: u32) -> Pool {
        Pool {
            name: format!("pools/{id}"),
            id: id.into(),
            kind: PoolKind::External as i32,
            region: "guizhou-guiyang".into(),
            rtt_ms: rtt,
            health: health as i32,
            utilisation: Some(util(capacity_p, allocated_p)),
            ..Default::default()
        }
    }

    fn keyed(prefix: &str, n: u64) -> Vec<KeyedUtilisation> {
        (0..n)
            .map(|i| KeyedUtilisation {
                key: format!("{prefix}-{i:02}"),
                utilisation: Some(util(100 + i, i)),
            })
            .collect()
    }

    fn queued(
        id: u64,
        tenant: &str,
        reason: WaitReason,
        position: u32,
        start: Option<u64>,
    ) -> Request {
        Request {
            name: format!("tenants/{tenant}/requests/{id}"),
            id,
            tenant: tenant.into(),
            spec: Some(RequestSpec {
                shape: Some(Shape::Gang(GangShape {
                    nodes: 2,
                    devices_per_node: 8,
                })),
                duration_ms: 3_600_000,
                priority: Priority::Standard as i32,
                ..Default::default()
            }),
            wait: Some(WaitInfo {
                reason: reason as i32,
                position,
                earliest_start_unix_ms: start,
            }),
            ..Default::default()
        }
    }

    /// 150 pools: a lost one, a draining one, a healthy one with devices out of service, and
    /// healthy ones of rising utilisation; 9 models, 28 regions, a queue of 3, 4 tenants.
    fn fleet() -> Snapshot {
        let mut pools = vec![
            pool("lost-pool", PoolHealth::Lost, 50, 0, 40),
            pool("draining-pool", PoolHealth::Draining, 60, 30, 30),
        ];
        let mut degraded = pool("degraded-pool", PoolHealth::Healthy, 70, 10, 20);
        if let Some(u) = degraded.utilisation.as_mut() {
            u.unavailable_devices = 8;
        }
        pools.push(degraded);
        for i in 0..147u64 {
            pools.push(pool(
                &format!("ext-{i:03}"),
                PoolHealth::Healthy,
                100,
                i % 101,
                (i % 50) as u32,
            ));
        }
        let capacity: u64 = pools
            .iter()
            .map(|p| p.utilisation.unwrap().capacity_tflops)
            .sum();
        let allocated: u64 = pools
            .iter()
            .map(|p| p.utilisation.unwrap().allocated_tflops)
            .sum();
        let total = Utilisation {
            capacity_tflops: capacity,
            allocated_tflops: allocated,
            ..Default::default()
        };
        let mut queue_head = vec![
            queued(
                7,
                "tenant-b",
                WaitReason::CapacityBusy,
                1,
                Some(NOW + 3_600_000),
            ),
            queued(9, "tenant-d", WaitReason::Quota, 2, None),
        ];
        let mut elastic = queued(
            11,
            "tenant-a",
            WaitReason::BehindReservation,
            3,
            Some(NOW - 5),
        );
        elastic.spec.as_mut().unwrap().shape = Some(Shape::Elastic(ElasticShape {
            tflops: 600 * T,
            min_chunk_tflops: 0,
        }));
        queue_head.push(elastic);
        let tenant = |id: &str, quota_p: u64, used_p: u64, queued: u32| Tenant {
            name: format!("tenants/{id}"),
            id: id.into(),
            quota_tflops: quota_p * T,
            weight: 1,
            usage: Some(TenantUsage {
                used_tflops: used_p * T,
                borrowed_tflops: used_p.saturating_sub(quota_p) * T,
                live_leases: 1,
                queued,
            }),
            ..Default::default()
        };
        Snapshot {
            fleet: FleetSummary {
                time_unix_ms: NOW,
                total: Some(total),
                local: Some(util(4000, 1000)),
                external: Some(util(10_960, 1234)),
                by_model: keyed("model", 9),
                by_region: keyed("region", 28),
                pools: Some(PoolHealthCounts {
                    healthy: 148,
                    draining: 1,
                    lost: 1,
                }),
                live_leases: 12,
                queue: Some(QueueSummary {
                    length: 3,
                    by_priority: vec![
                        PriorityCount {
                            priority: Priority::Critical as i32,
                            count: 0,
                        },
                        PriorityCount {
                            priority: Priority::Standard as i32,
                            count: 3,
                        },
                    ],
                    by_reason: vec![
                        WaitReasonCount {
                            reason: WaitReason::Quota as i32,
                            count: 1,
                        },
                        WaitReasonCount {
                            reason: WaitReason::CapacityBusy as i32,
                            count: 1,
                        },
                    ],
                }),
                target_tflops: 20_000 * T,
                ..Default::default()
            },
            pools,
            queue_head,
            tenants: vec![
                tenant("tenant-a", 2000, 100, 1),
                tenant("tenant-b", 1000, 1500, 1),
                tenant("tenant-c", 1000, 0, 0),
                tenant("tenant-d", 500, 0, 1),
            ],
        }
    }

    fn view<'a>(data: Option<&'a Snapshot>, failure: Option<&'a Failure>) -> View<'a> {
        View {
            addr: "http://127.0.0.1:50051",
            interval: Duration::from_secs(2),
            sort: SortKey::Util,
            live: true,
            now_unix_ms: NOW + 30_000,
            data: data.map(|s| (s, NOW)),
            failure,
        }
    }

    fn size(width: usize, height: usize) -> Size {
        Size {
            width,
            height: Some(height),
        }
    }

    fn texts(frame: &Frame) -> Vec<&str> {
        frame.lines.iter().map(|l| l.text.as_str()).collect()
    }

    /// The index of the first line that starts with `prefix`.
    fn line_of(frame: &Frame, prefix: &str) -> Option<usize> {
        frame.lines.iter().position(|l| l.text.starts_with(prefix))
    }

    #[test]
    fn bars_fill_in_proportion_and_never_overflow() {
        assert_eq!(bar(0, 10, 12), "[..........]");
        assert_eq!(bar(5, 10, 12), "[#####.....]");
        assert_eq!(bar(10, 10, 7), "[#####]");
        assert_eq!(bar(1, 3, 5), "[#..]");
        // Borrowing beyond a quota fills the bar, no more.
        assert_eq!(bar(30, 10, 7), "[#####]");
        assert_eq!(bar(u64::MAX, u64::MAX, 7), "[#####]");
        // Nothing to fill: an empty bar, not a division by zero.
        assert_eq!(bar(5, 0, 7), "[.....]");
        assert_eq!(bar(1, 2, 2), "#.");
        assert_eq!(bar(1, 2, 0), "");
        for width in 0..40 {
            assert_eq!(bar(7, 9, width).chars().count(), width);
        }
    }

    #[test]
    fn every_frame_fits_its_terminal() {
        let s = fleet();
        let failure = Failure {
            unreachable: true,
            error: "cannot connect to the broker at http://127.0.0.1:50051/: transport error"
                .into(),
            since_unix_ms: NOW + 10_000,
        };
        for (data, failure) in [
            (Some(&s), None),
            (Some(&s), Some(&failure)),
            (None, Some(&failure)),
        ] {
            for (w, h) in [
                (80, 24),
                (120, 40),
                (200, 60),
                (40, 10),
                (20, 5),
                (1, 1),
                (0, 0),
            ] {
                let frame = render(&view(data, failure), size(w, h));
                assert!(
                    frame.lines.len() <= h,
                    "{w}x{h}: {} lines",
                    frame.lines.len()
                );
                for line in &frame.lines {
                    assert!(line.text.chars().count() <= w, "{w}x{h}: {:?}", line.text);
                }
                assert!(!frame.text().contains('\x1b'));
            }
        }
    }

    #[test]
    fn pool_rows_are_cut_to_the_height_and_say_how_many_are_left() {
        let s = fleet();
        for (w, h) in [(80, 24), (120, 40), (200, 60)] {
            let frame = render(&view(Some(&s), None), size(w, h));
            assert_eq!(
                frame.lines.len(),
                h,
                "{w}x{h}: the pools take the room left"
            );
            let header = line_of(&frame, "POOL ").expect("pool table header");
            let more = line_of(&frame, "... ").expect("a line for the pools that did not fit");
            // The queue stays on the screen below the pools.
            assert!(line_of(&frame, "QUEUE 3 waiting").is_some_and(|q| q > more));
            let shown = more - header - 1;
            assert!(shown >= 5, "{w}x{h}: only {shown} pool rows");
            assert_eq!(
                frame.lines[more].text,
                format!("... {} more pools", s.pools.len() - shown)
            );
            // The tenants too, given the room; on 24 lines the less urgent sections give way.
            let tenants = line_of(&frame, "TENANT ");
            if h >= 40 {
                assert!(tenants.is_some_and(|t| t > more), "{w}x{h}");
            } else {
                assert_eq!(tenants, None);
            }
        }
        // A taller terminal shows more pools.
        let rows = |h| {
            let f = render(&view(Some(&s), None), size(120, h));
            f.lines
                .iter()
                .filter(|l| l.text.starts_with("ext-"))
                .count()
        };
        assert!(rows(60) > rows(40));
    }

    #[test]
    fn without_a_height_limit_everything_is_shown() {
        let s = fleet();
        let frame = render(
            &view(Some(&s), None),
            Size {
                width: 160,
                height: None,
            },
        );
        let text = frame.text();
        for pool in &s.pools {
            assert_eq!(
                frame
                    .lines
                    .iter()
                    .filter(|l| l.text.starts_with(&format!("{} ", pool.id)))
                    .count(),
                1,
                "{}",
                pool.id
            );
        }
        for tenant in &s.tenants {
            assert!(text.contains(&tenant.id));
        }
        for r in s.fleet.by_model.iter().chain(&s.fleet.by_region) {
            assert!(text.contains(&r.key), "{}", r.key);
        }
        assert!(!text.contains("... "), "{text}");
        // Sections are set apart by blank lines when there is room for them.
        assert!(frame.lines.iter().any(|l| l.text.is_empty()));
    }

    #[test]
    fn pools_that_need_a_look_come_first_then_the_busiest() {
        let s = fleet();
        let frame = render(&view(Some(&s), None), size(160, 50));
        let header = line_of(&frame, "POOL ").unwrap();
        let ids: Vec<&str> = texts(&frame)[header + 1..]
            .iter()
            .take(6)
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        // Utilisation of ext-i is i % 101 out of 100: ext-100 is full, then ext-099, ...
        assert_eq!(
            ids,
            [
                "lost-pool",
                "draining-pool",
                "degraded-pool",
                "ext-100",
                "ext-099",
                "ext-098"
            ]
        );
        for l in &frame.lines[header + 1..header + 4] {
            assert_eq!(l.style, Style::Warn, "{}", l.text);
        }
        assert_eq!(frame.lines[header + 4].style, Style::Plain);
        assert!(frame.lines[header + 3].text.contains("healthy (8 down)"));
    }

    #[test]
    fn every_sort_order_keeps_the_unhealthy_pools_first() {
        let s = fleet();
        for (sort, after) in [
            (SortKey::Util, ["ext-100", "ext-099"]),
            (SortKey::Free, ["ext-000", "ext-101"]),
            (SortKey::Capacity, ["ext-000", "ext-001"]),
            (SortKey::Rtt, ["ext-000", "ext-050"]),
            (SortKey::Name, ["ext-000", "ext-001"]),
        ] {
            let mut pools: Vec<&Pool> = s.pools.iter().collect();
            sort_pools(&mut pools, sort);
            let ids: Vec<&str> = pools.iter().take(5).map(|p| p.id.as_str()).collect();
            assert_eq!(
                ids,
                [
                    "lost-pool",
                    "draining-pool",
                    "degraded-pool",
                    after[0],
                    after[1]
                ],
                "{sort:?}"
            );
        }
    }

    #[test]
    fn the_summary_has_the_totals_and_the_marks() {
        let s = fleet();
        let frame = render(&view(Some(&s), None), size(120, 40));
        let total = s.fleet.total.unwrap();
        let line = &frame.lines[line_of(&frame, "total ").unwrap()].text;
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[1], p(total.capacity_tflops));
        assert_eq!(cells[2], p(total.allocated_tflops));
        assert_eq!(cells[3], p(total.capacity_tflops - total.allocated_tflops));
        assert_eq!(cells[4], pct(total.allocated_tflops, total.capacity_tflops));
        assert!(cells[5].starts_with('['), "{line}");
        let marks = &frame.lines[line_of(&frame, "capacity against").unwrap()].text;
        let of = |mark: u64| pct(total.capacity_tflops, mark * T);
        assert!(
            marks.contains(&format!("10000P (end of 2024) {} %", of(10_000))),
            "{marks}"
        );
        assert!(
            marks.contains(&format!("20000P (2025 target) {} %", of(20_000))),
            "{marks}"
        );
        // The broker's target is one of the marks here, so it is not repeated.
        assert!(!marks.contains("target 20000P"), "{marks}");
        let mut other = s.clone();
        other.fleet.target_tflops = 25_000 * T;
        let frame = render(&view(Some(&other), None), size(120, 40));
        assert!(
            frame
                .text()
                .contains(&format!("target 25000P {} %", of(25_000)))
        );
        assert!(
            frame
                .text()
                .contains("pools 150: 148 healthy, 1 draining, 1 lost")
        );
    }

    #[test]
    fn models_and_regions_sit_side_by_side_when_wide_enough() {
        let s = fleet();
        let wide = render(&view(Some(&s), None), size(200, 60));
        let both = line_of(&wide, "MODEL ").unwrap();
        assert!(wide.lines[both].text.contains("REGION"));
        let narrow = render(&view(Some(&s), None), size(80, 60));
        let model = line_of(&narrow, "MODEL ").unwrap();
        assert!(!narrow.lines[model].text.contains("REGION"));
        assert!(line_of(&narrow, "REGION ").is_some_and(|r| r > model));
        // Largest first: model-08 has the most capacity.
        assert!(narrow.lines[model + 1].text.starts_with("model-08 "));
    }

    #[test]
    fn the_queue_shows_its_counts_and_its_head() {
        let s = fleet();
        let frame = render(&view(Some(&s), None), size(120, 60));
        let text = frame.text();
        assert!(
            text.contains("QUEUE 3 waiting: critical 0, standard 3"),
            "{text}"
        );
        assert!(
            text.contains("by reason: quota 1, capacity_busy 1"),
            "{text}"
        );
        let head = line_of(&frame, "POS ").unwrap();
        let row = |i: usize| {
            frame.lines[head + i]
                .text
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row(1),
            [
                "1",
                "tenant-b",
                "gang",
                "2x8",
                "standard",
                "capacity_busy",
                "in",
                "1h",
                "7"
            ]
        );
        assert_eq!(
            row(2),
            [
                "2", "tenant-d", "gang", "2x8", "standard", "quota", "-", "9"
            ]
        );
        assert_eq!(
            row(3),
            [
                "3",
                "tenant-a",
                "elastic",
                "600P",
                "standard",
                "behind_reservation",
                "now",
                "11"
            ]
        );
        // A longer queue than the head fetched counts the rest.
        let mut long = s.clone();
        long.fleet.queue.as_mut().unwrap().length = 500;
        let frame = render(&view(Some(&long), None), size(120, 60));
        assert!(frame.text().contains("... 497 more queued requests"));
        let mut none = s.clone();
        none.fleet.queue = None;
        none.queue_head.clear();
        let frame = render(&view(Some(&none), None), size(120, 60));
        assert!(line_of(&frame, "QUEUE empty").is_some());
    }

    #[test]
    fn tenants_show_usage_against_quota_heaviest_first() {
        let s = fleet();
        let frame = render(&view(Some(&s), None), size(120, 60));
        let head = line_of(&frame, "TENANT ").unwrap();
        let first: Vec<&str> = frame.lines[head + 1].text.split_whitespace().collect();
        // tenant-b uses 1500P of a 1000P quota: 150 %, 500P borrowed, the bar full.
        assert_eq!(&first[..4], ["tenant-b", "1000.0", "1500.0", "150.0"]);
        assert!(
            first[4].starts_with("[#") && !first[4].contains('.'),
            "{first:?}"
        );
        assert_eq!(first[5], "500.0");
        assert!(frame.lines[head + 2].text.starts_with("tenant-a "));
    }

    #[test]
    fn an_unreachable_broker_is_shown_with_its_error() {
        let failure = Failure {
            unreachable: true,
            error: "cannot connect to the broker at http://127.0.0.1:1/: transport error".into(),
            since_unix_ms: NOW + 20_000,
        };
        // Before any figures: the notice and nothing pretending to be figures.
        let frame = render(&view(None, Some(&failure)), size(100, 24));
        assert_eq!(frame.lines[1].style, Style::Alert);
        let text = frame.text();
        assert!(
            text.contains(&format!("BROKER UNREACHABLE: {}", failure.error)),
            "{text}"
        );
        assert!(text.contains("retrying every 2s"), "{text}");
        assert!(text.contains("No figures yet"), "{text}");
        assert!(!text.contains(" ago"), "{text}");
        assert!(!text.contains("POOL") && !text.contains("total "), "{text}");
        // With earlier figures: the notice on top, the last figures below it with their age.
        let s = fleet();
        let frame = render(&view(Some(&s), Some(&failure)), size(200, 24));
        assert_eq!(frame.lines[1].style, Style::Alert);
        assert!(frame.text().contains("from 2025-11-28T00:00:00Z, 30s ago"));
        assert!(line_of(&frame, "total ").is_some());
        // A narrow terminal wraps the error rather than cutting it off.
        let frame = render(&view(None, Some(&failure)), size(30, 24));
        let alert: String = frame
            .lines
            .iter()
            .filter(|l| l.style == Style::Alert)
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(alert.contains(&failure.error), "{alert}");
        // A refusal is told apart from unreachability.
        let refused = Failure {
            unreachable: false,
            error: "PERMISSION_DENIED: not an operator".into(),
            ..failure
        };
        let frame = render(&view(None, Some(&refused)), size(100, 24));
        assert!(frame.text().contains("BROKER ERROR: PERMISSION_DENIED"));
    }

    #[test]
    fn wrapping_breaks_at_spaces() {
        assert_eq!(wrap("ab cd ef", 5, 9), ["ab cd", "ef"]);
        assert_eq!(wrap("abcdefgh ij", 3, 9), ["abc", "def", "gh", "ij"]);
        assert_eq!(wrap("a b c d", 1, 2), ["a", "b"]);
        assert_eq!(wrap("", 10, 2), Vec::<String>::new());
        assert_eq!(wrap("x", 0, 2), ["x"]);
    }

    #[test]
    fn errors_are_classified() {
        assert!(is_unreachable(&Status::unavailable("down").into()));
        assert!(is_unreachable(
            &anyhow::Error::from(NoAnswer).context("refreshing")
        ));
        assert!(!is_unreachable(&Status::permission_denied("no").into()));
        assert!(!is_unreachable(&anyhow::anyhow!("no token")));
    }

    #[test]
    fn a_failure_keeps_the_figures_and_the_time_it_began() {
        let mut state = State::default();
        assert!(state.update(Ok(fleet()), NOW).is_ok());
        assert!(
            state
                .update(Err(Status::unavailable("a").into()), NOW + 1)
                .is_err()
        );
        assert!(
            state
                .update(Err(Status::unavailable("b").into()), NOW + 2)
                .is_err()
        );
        let f = state.failure.as_ref().unwrap();
        assert_eq!(f.since_unix_ms, NOW + 1);
        assert!(f.error.contains(": b"), "{}", f.error);
        assert_eq!(state.data.as_ref().map(|d| d.1), Some(NOW));
        assert!(state.update(Ok(fleet()), NOW + 3).is_ok());
        assert!(state.failure.is_none());
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        top: TopArgs,
    }

    #[test]
    fn arguments() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(std::iter::once("top").chain(args.iter().copied()));
        let a = parse(&[]).unwrap().top;
        assert_eq!(
            (a.interval, a.once, a.sort),
            (Duration::from_secs(2), false, SortKey::Util)
        );
        let a = parse(&["--interval", "0.5", "--once", "--sort", "rtt"])
            .unwrap()
            .top;
        assert_eq!(
            (a.interval, a.once, a.sort),
            (Duration::from_millis(500), true, SortKey::Rtt)
        );
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["0", "-1", "0.01", "NaN", "inf", "1e300", "soon", "", "2d"] {
            let err = parse(&[&format!("--interval={bad}")]).unwrap_err();
            assert!(err.to_string().contains("--interval"), "{bad}: {err}");
        }
        assert!(parse(&["--sort", "price"]).is_err());
    }

    #[test]
    fn keys() {
        let key = |code, modifiers| Event::Key(KeyEvent::new(code, modifiers));
        assert_eq!(
            input_of(&key(KeyCode::Char('q'), KeyModifiers::NONE)),
            Some(Input::Quit)
        );
        assert_eq!(
            input_of(&key(KeyCode::Esc, KeyModifiers::NONE)),
            Some(Input::Quit)
        );
        assert_eq!(
            input_of(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Input::Quit)
        );
        assert_eq!(input_of(&key(KeyCode::Char('c'), KeyModifiers::NONE)), None);
        assert_eq!(
            input_of(&key(KeyCode::Char('s'), KeyModifiers::NONE)),
            Some(Input::NextSort)
        );
        assert_eq!(input_of(&Event::Resize(80, 24)), Some(Input::Redraw));
        let mut sort = SortKey::Util;
        for _ in 0..5 {
            sort = sort.next();
        }
        assert_eq!(sort, SortKey::Util);
    }
}
