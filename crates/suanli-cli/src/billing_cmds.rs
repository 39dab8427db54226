//! Accounting on the command line: compute vouchers (`vouchers`, `vouchers issue`), statements
//! (`bill`), the district's subsidy report (`subsidy`) and tenants' budgets (`budget`).
//!
//! `vouchers` and `bill` serve tenants and operators alike. With `--token`, the token decides:
//! an operator's token reads any tenant (`--tenant T`), a tenant's token its own. Without one,
//! the credentials file's operator token is used when `--tenant` names the tenant to read
//! (`vouchers` lists every tenant's without it), and `bill` without `--tenant` is the first
//! tenant's own statement.

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use suanli_proto::v1::{
    AdjustBalanceRequest, Budget, BudgetPeriod, GetStatementRequest, GetSubsidyReportRequest,
    IssueVoucherRequest, ListVouchersRequest, PoolKind, SetBudgetRequest, SetSubsidyBudgetRequest,
    Statement, VoucherBalance, VoucherScope, VoucherSpec,
};
use tonic::Code;

use crate::client::{self, GlobalArgs};
use crate::output;
use crate::time;

/// `suanli vouchers`: list vouchers with their balances, or issue one.
#[derive(Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VouchersArgs {
    #[command(subcommand)]
    pub action: Option<VouchersAction>,
}

/// What to do with vouchers.
#[derive(Subcommand, Clone, Debug)]
pub enum VouchersAction {
    /// Issue a compute voucher to the tenant named by --tenant (operator).
    Issue(IssueArgs),
}

/// `suanli vouchers issue`.
#[derive(Args, Clone, Debug)]
pub struct IssueArgs {
    /// Voucher id [default: FT-<tenant>-<time of issue>].
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Face value in yuan (10000, 2500.50).
    #[arg(long, value_name = "YUAN", value_parser = yuan_fen)]
    pub face: i64,
    /// Share of each bill the voucher pays: 50%, 12.5%.
    #[arg(long, value_name = "PERCENT", value_parser = rate_bp)]
    pub rate: u32,
    /// Where it pays: local (the district's centre and clouds), all, pool:ID,ID or
    /// kind:local_centre,local_cloud,external.
    #[arg(long, value_name = "SCOPE", value_parser = scope, default_value = "local")]
    pub scope: VoucherScope,
    /// Start of validity: a date (2025-03-01, midnight China Standard Time), an RFC 3339 time
    /// or +DURATION from now [default: now].
    #[arg(long, value_name = "DATE", value_parser = date_ms)]
    pub from: Option<DateArg>,
    /// End of validity (exclusive), as --from.
    #[arg(long, value_name = "DATE", value_parser = date_ms)]
    pub until: DateArg,
    /// Most the voucher pays towards one lease, in yuan [default: no cap].
    #[arg(long, value_name = "YUAN", value_parser = yuan_fen)]
    pub cap_per_lease: Option<i64>,
}

/// `suanli bill`.
#[derive(Args, Clone, Debug)]
pub struct BillArgs {
    /// The month, YYYY-MM [default: this month, China Standard Time].
    #[arg(long, value_name = "YYYY-MM", value_parser = month)]
    pub month: Option<String>,
    /// Print the statement as CSV: the usage lines, a blank line, the voucher lines.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
}

/// `suanli subsidy`.
#[derive(Args, Clone, Debug)]
pub struct SubsidyArgs {
    /// First month, YYYY-MM [default: this month].
    #[arg(long, value_name = "YYYY-MM", value_parser = month)]
    pub from: Option<String>,
    /// Last month, YYYY-MM [default: the first].
    #[arg(long, value_name = "YYYY-MM", value_parser = month)]
    pub to: Option<String>,
    /// Print the report as CSV.
    #[arg(long)]
    pub csv: bool,
    /// First set the district's monthly subsidy budget, in yuan, that the report sets spending
    /// against.
    #[arg(long, value_name = "YUAN", value_parser = yuan_fen)]
    pub set_budget: Option<i64>,
    /// First remove the district's monthly subsidy budget.
    #[arg(long, conflicts_with = "set_budget")]
    pub remove_budget: bool,
}

/// `suanli adjust`: correct what the tenant named by --tenant owes (operator).
#[derive(Args, Clone, Debug)]
pub struct AdjustArgs {
    /// Yuan to charge the tenant, or with a leading `-` to credit it (`-150.00`).
    #[arg(long, value_name = "YUAN", value_parser = signed_yuan_fen, allow_hyphen_values = true)]
    pub amount: i64,
    /// Why, shown on the tenant's statement.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

/// `suanli budget`: set or remove the budget of the tenant named by --tenant (operator).
#[derive(Args, Clone, Debug)]
pub struct BudgetArgs {
    /// Most the tenant may pay itself (after subsidy) per period, in yuan.
    #[arg(long, value_name = "YUAN", value_parser = yuan_fen, required_unless_present = "remove")]
    pub limit: Option<i64>,
    /// The period of the limit.
    #[arg(long, value_enum, default_value = "month")]
    pub per: PeriodArg,
    /// Remove the tenant's budget.
    #[arg(long, conflicts_with = "limit")]
    pub remove: bool,
}

/// A budget period on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeriodArg {
    /// Each calendar month afresh.
    Month,
    /// Everything, ever.
    Total,
}

/// A time given as a date, an RFC 3339 time or relative to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DateArg {
    /// Milliseconds since the epoch.
    At(u64),
    /// This long from now.
    In(u64),
}

impl DateArg {
    fn resolve(self, now: u64) -> u64 {
        match self {
            DateArg::At(ms) => ms,
            DateArg::In(ms) => now.saturating_add(ms),
        }
    }
}

/// Yuan with up to two decimals (`10000`, `2500.5`, `¥12.34`) in fen.
pub fn yuan_fen(text: &str) -> Result<i64, String> {
    let t = text.trim().trim_start_matches('¥');
    let bad = || format!("{text:?}: expected an amount in yuan with at most 2 decimals (2500.50)");
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(whole) || (!frac.is_empty() && !digits(frac)) || frac.len() > 2 {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(100)
        .and_then(|f| f.checked_add(frac))
        .ok_or_else(bad)
}

/// Yuan as [`yuan_fen`], or with a leading `-` the negative amount.
pub fn signed_yuan_fen(text: &str) -> Result<i64, String> {
    match text.trim().strip_prefix('-') {
        Some(rest) => yuan_fen(rest).map(|f| -f),
        None => yuan_fen(text),
    }
}

/// A rate in percent with up to two decimals (`50%`, `12.5%`) in basis points, 0.01% to 100%.
pub fn rate_bp(text: &str) -> Result<u32, String> {
    let t = text.trim().trim_end_matches('%');
    let bad = || format!("{text:?}: expected a percentage from 0.01% to 100% (50%)");
    let fen = yuan_fen(t).map_err(|_| bad())?;
    if !(1..=10_000).contains(&fen) {
        return Err(bad());
    }
    Ok(fen as u32)
}

/// A voucher scope: `local`, `all`, `pool:ID,ID` or `kind:KIND,KIND`.
pub fn scope(text: &str) -> Result<VoucherScope, String> {
    let t = text.trim();
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect()
    };
    let kinds = |names: Vec<String>| -> Result<Vec<i32>, String> {
        names
            .iter()
            .map(|k| match k.as_str() {
                "local_centre" => Ok(PoolKind::LocalCentre as i32),
                "local_cloud" => Ok(PoolKind::LocalCloud as i32),
                "external" => Ok(PoolKind::External as i32),
                other => Err(format!(
                    "{other:?} is not a pool kind (local_centre, local_cloud, external)"
                )),
            })
            .collect()
    };
    let scope = match t {
        "all" => VoucherScope {
            all_pools: true,
            ..Default::default()
        },
        "local" => VoucherScope {
            pool_kinds: vec![PoolKind::LocalCentre as i32, PoolKind::LocalCloud as i32],
            ..Default::default()
        },
        _ => match t.split_once(':') {
            Some(("pool", ids)) if !list(ids).is_empty() => VoucherScope {
                pools: list(ids),
                ..Default::default()
            },
            Some(("kind", names)) if !list(names).is_empty() => VoucherScope {
                pool_kinds: kinds(list(names))?,
                ..Default::default()
            },
            _ => {
                return Err(format!(
                    "{text:?}: expected local, all, pool:ID,ID or kind:KIND,KIND"
                ));
            }
        },
    };
    Ok(scope)
}

/// A date (`2025-03-01`, midnight China Standard Time), an RFC 3339 time or `+DURATION`.
pub fn date_ms(text: &str) -> Result<DateArg, String> {
    let t = text.trim();
    if let Some(rel) = t.strip_prefix('+') {
        return crate::parse::duration_ms(rel).map(DateArg::In);
    }
    let is_date = t.len() == 10 && t.as_bytes()[4] == b'-' && t.as_bytes()[7] == b'-';
    let full = if is_date {
        format!("{t}T00:00:00+08:00")
    } else {
        t.to_string()
    };
    time::parse_rfc3339(&full)
        .map(DateArg::At)
        .map_err(|_| format!("{text:?}: expected a date (2025-03-01), an RFC 3339 time or +30d"))
}

/// A month, `YYYY-MM`.
pub fn month(text: &str) -> Result<String, String> {
    text.trim()
        .parse::<suanli_billing::Month>()
        .map(|m| m.to_string())
        .map_err(|e| e.to_string())
}

fn tenant_flag(g: &GlobalArgs, what: &str) -> anyhow::Result<String> {
    match &g.tenant {
        Some(t) => Ok(t.clone()),
        None => bail!("{what} needs --tenant NAME"),
    }
}

/// `suanli vouchers ...`.
pub async fn vouchers(g: &GlobalArgs, a: &VouchersArgs) -> anyhow::Result<()> {
    match &a.action {
        Some(VouchersAction::Issue(i)) => issue(g, i).await,
        None => list(g).await,
    }
}

async fn list(g: &GlobalArgs) -> anyhow::Result<()> {
    let tenant = g.tenant.clone().unwrap_or_default();
    let as_operator = client::operator_client(g)
        .await?
        .list_vouchers(ListVouchersRequest {
            tenant: tenant.clone(),
        })
        .await;
    let vouchers = match as_operator {
        Ok(r) => r.into_inner().vouchers,
        // A tenant's token: its own vouchers.
        Err(s) if s.code() == Code::PermissionDenied && g.token.is_some() => {
            let (mut c, _) = client::tenant_client(g).await?;
            // Another tenant's name is refused by the broker, not silently dropped.
            c.list_vouchers(ListVouchersRequest { tenant })
                .await?
                .into_inner()
                .vouchers
        }
        Err(s) => return Err(s.into()),
    };
    if g.json {
        output::print_json(&json!({
            "vouchers": vouchers.iter().map(voucher_json).collect::<Vec<_>>(),
        }));
    } else {
        output::emit(&vouchers_table(&vouchers).render());
    }
    Ok(())
}

async fn issue(g: &GlobalArgs, a: &IssueArgs) -> anyhow::Result<()> {
    let tenant = tenant_flag(g, "vouchers issue")?;
    let now = time::now_unix_ms();
    let id = a.id.clone().unwrap_or_else(|| {
        let stamp: String = time::format_rfc3339(now)
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        format!("FT-{tenant}-{stamp}")
    });
    let spec = VoucherSpec {
        id: id.clone(),
        tenant,
        face_value_fen: a.face,
        rate_bp: a.rate,
        per_lease_cap_fen: a.cap_per_lease,
        scope: Some(a.scope.clone()),
        valid_from_unix_ms: a.from.map_or(now, |f| f.resolve(now)),
        valid_until_unix_ms: a.until.resolve(now),
    };
    let v = client::operator_client(g)
        .await?
        .issue_voucher(IssueVoucherRequest {
            voucher: Some(spec),
            // Retrying the same issue is safe: the key is the voucher's id.
            request_id: format!("issue-voucher:{id}"),
        })
        .await?
        .into_inner();
    if g.json {
        output::print_json(&voucher_json(&v));
    } else {
        output::emit(&vouchers_table(&[v]).render());
    }
    Ok(())
}

/// `suanli bill`.
pub async fn bill(g: &GlobalArgs, a: &BillArgs) -> anyhow::Result<()> {
    let month = a.month.clone().unwrap_or_default();
    let statement = if g.tenant.is_some() {
        let tenant = g.tenant.clone().unwrap_or_default();
        let as_operator = client::operator_client(g)
            .await?
            .get_statement(GetStatementRequest {
                tenant: tenant.clone(),
                month: month.clone(),
            })
            .await;
        match as_operator {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::PermissionDenied && g.token.is_some() => {
                tenant_statement(g, month).await?
            }
            Err(s) => return Err(s.into()),
        }
    } else {
        tenant_statement(g, month).await?
    };
    if a.csv {
        output::emit(&format!(
            "{}\n{}",
            statement.usage_csv, statement.vouchers_csv
        ));
    } else if g.json {
        output::print_json(&statement_json(&statement));
    } else {
        output::emit(&statement_text(&statement));
    }
    Ok(())
}

async fn tenant_statement(g: &GlobalArgs, month: String) -> anyhow::Result<Statement> {
    let (mut c, _) = client::tenant_client(g).await?;
    Ok(c.get_statement(GetStatementRequest {
        // Another tenant's name is refused by the broker, not silently dropped.
        tenant: g.tenant.clone().unwrap_or_default(),
        month,
    })
    .await?
    .into_inner())
}

/// `suanli adjust`.
pub async fn adjust(g: &GlobalArgs, a: &AdjustArgs) -> anyhow::Result<()> {
    let tenant = tenant_flag(g, "adjust")?;
    let done = client::operator_client(g)
        .await?
        .adjust_balance(AdjustBalanceRequest {
            tenant,
            amount_fen: a.amount,
            reason: a.reason.clone(),
            request_id: crate::parse::new_request_id(),
        })
        .await?
        .into_inner();
    if g.json {
        output::print_json(&json!({
            "tenant": done.tenant,
            "month": done.month,
            "amount_fen": a.amount,
            "reason": a.reason,
        }));
    } else {
        output::emit(&format!(
            "tenant  {}\nmonth   {}\namount  {} CNY\nreason  {}\n",
            done.tenant,
            done.month,
            signed_cny(a.amount),
            a.reason
        ));
    }
    Ok(())
}

/// `suanli subsidy`.
pub async fn subsidy(g: &GlobalArgs, a: &SubsidyArgs) -> anyhow::Result<()> {
    let mut client = client::operator_client(g).await?;
    if a.set_budget.is_some() || a.remove_budget {
        client
            .set_subsidy_budget(SetSubsidyBudgetRequest {
                monthly_fen: a.set_budget,
                request_id: crate::parse::new_request_id(),
            })
            .await?;
    }
    let report = client
        .get_subsidy_report(GetSubsidyReportRequest {
            first_month: a.from.clone().unwrap_or_default(),
            last_month: a.to.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    if a.csv {
        output::emit(&report.csv);
        return Ok(());
    }
    if g.json {
        let months: Vec<Value> = report
            .months
            .iter()
            .map(|m| {
                json!({
                    "month": m.month,
                    "by_pool_kind": m.by_pool_kind.iter().map(|k| json!({
                        "pool_kind": output::pool_kind(k.pool_kind),
                        "amount_fen": k.amount_fen,
                    })).collect::<Vec<_>>(),
                    "spent_fen": m.spent_fen,
                    "issued_fen": m.issued_fen,
                    "budget_fen": m.budget_fen,
                    "remaining_fen": m.remaining_fen,
                })
            })
            .collect();
        output::print_json(&json!({ "months": months }));
        return Ok(());
    }
    let mut t = output::Table::new(&[
        "MONTH",
        ">LOCAL CENTRE",
        ">LOCAL CLOUD",
        ">EXTERNAL",
        ">SPENT CNY",
        ">ISSUED CNY",
        ">BUDGET CNY",
        ">LEFT CNY",
    ]);
    for m in &report.months {
        let kind = |k: PoolKind| {
            m.by_pool_kind
                .iter()
                .find(|x| x.pool_kind == k as i32)
                .map_or(0, |x| x.amount_fen)
        };
        t.row(vec![
            m.month.clone(),
            signed_cny(kind(PoolKind::LocalCentre)),
            signed_cny(kind(PoolKind::LocalCloud)),
            signed_cny(kind(PoolKind::External)),
            signed_cny(m.spent_fen),
            signed_cny(m.issued_fen),
            m.budget_fen.map_or("-".into(), signed_cny),
            m.remaining_fen.map_or("-".into(), signed_cny),
        ]);
    }
    output::emit(&t.render());
    Ok(())
}

/// `suanli budget`.
pub async fn budget(g: &GlobalArgs, a: &BudgetArgs) -> anyhow::Result<()> {
    let tenant = tenant_flag(g, "budget")?;
    let budget = match (a.remove, a.limit) {
        (true, _) | (false, None) => None,
        (false, Some(limit_fen)) => Some(Budget {
            limit_fen,
            period: match a.per {
                PeriodArg::Month => BudgetPeriod::Monthly,
                PeriodArg::Total => BudgetPeriod::Total,
            } as i32,
        }),
    };
    let set = client::operator_client(g)
        .await?
        .set_budget(SetBudgetRequest {
            tenant,
            budget,
            request_id: crate::parse::new_request_id(),
        })
        .await?
        .into_inner();
    let text = match &set.budget {
        Some(b) => format!("{} CNY {}", signed_cny(b.limit_fen), period_name(b.period)),
        None => "none".into(),
    };
    if g.json {
        output::print_json(&json!({
            "tenant": set.tenant,
            "budget": set.budget.map(|b| json!({
                "limit_fen": b.limit_fen,
                "period": period_name(b.period),
            })),
        }));
    } else {
        output::emit(&format!("tenant  {}\nbudget  {text}\n", set.tenant));
    }
    Ok(())
}

fn period_name(p: i32) -> &'static str {
    match BudgetPeriod::try_from(p) {
        Ok(BudgetPeriod::Monthly) => "monthly",
        Ok(BudgetPeriod::Total) => "total",
        _ => "unspecified",
    }
}

/// Signed fen as CNY with two decimals.
fn signed_cny(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    format!("{sign}{}", output::cny(fen.unsigned_abs()))
}

fn rate_text(bp: u32) -> String {
    let s = format!("{}.{:02}", bp / 100, bp % 100);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

fn vouchers_table(vouchers: &[VoucherBalance]) -> output::Table {
    let mut t = output::Table::new(&[
        "ID",
        "TENANT",
        ">RATE",
        "SCOPE",
        "VALID FROM",
        "VALID UNTIL",
        ">ISSUED CNY",
        ">USED CNY",
        ">LEFT CNY",
        ">CAP/LEASE",
    ]);
    for v in vouchers {
        let s = v.spec.clone().unwrap_or_default();
        t.row(vec![
            s.id,
            s.tenant,
            rate_text(s.rate_bp),
            v.scope_label.clone(),
            output::time(s.valid_from_unix_ms),
            output::time(s.valid_until_unix_ms),
            signed_cny(s.face_value_fen),
            signed_cny(v.used_fen),
            signed_cny(v.remaining_fen),
            s.per_lease_cap_fen.map_or("-".into(), signed_cny),
        ]);
    }
    t
}

fn voucher_json(v: &VoucherBalance) -> Value {
    let s = v.spec.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "tenant": s.tenant,
        "face_value_fen": s.face_value_fen,
        "rate_bp": s.rate_bp,
        "per_lease_cap_fen": s.per_lease_cap_fen,
        "scope": v.scope_label,
        "valid_from_unix_ms": s.valid_from_unix_ms,
        "valid_until_unix_ms": s.valid_until_unix_ms,
        "issued_unix_ms": v.issued_unix_ms,
        "used_fen": v.used_fen,
        "remaining_fen": v.remaining_fen,
    })
}

fn milli(m: u64) -> String {
    format!("{}.{:03}", m / 1000, m % 1000)
}

fn statement_text(s: &Statement) -> String {
    let mut out = format!(
        "tenant       {}\nmonth        {}\nleases       {}\ncost         {} CNY\nsubsidy      {} CNY\ndue          {} CNY\nadjustments  {} CNY\npayable      {} CNY\n",
        s.tenant,
        s.month,
        s.leases,
        signed_cny(s.cost_fen),
        signed_cny(s.subsidy_fen),
        signed_cny(s.due_fen),
        signed_cny(s.adjustments_fen),
        signed_cny(s.payable_fen),
    );
    if !s.lines.is_empty() {
        let mut t = output::Table::new(&[
            "MODEL",
            "POOL KIND",
            ">PARTS",
            ">P-HOURS",
            ">COST CNY",
            ">SUBSIDY CNY",
            ">DUE CNY",
        ]);
        for l in &s.lines {
            t.row(vec![
                l.model.clone(),
                output::pool_kind(l.pool_kind),
                l.lease_parts.to_string(),
                milli(l.milli_p_hours),
                signed_cny(l.cost_fen),
                signed_cny(l.subsidy_fen),
                signed_cny(l.due_fen),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if !s.vouchers.is_empty() {
        let mut t = output::Table::new(&[
            "VOUCHER",
            ">RATE",
            "SCOPE",
            ">ISSUED CNY",
            ">USED IN MONTH",
            ">LEFT CNY",
        ]);
        for v in &s.vouchers {
            t.row(vec![
                v.voucher.clone(),
                rate_text(v.rate_bp),
                v.scope.clone(),
                signed_cny(v.issued_fen),
                signed_cny(v.used_in_month_fen),
                signed_cny(v.remaining_fen),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if !s.adjustments.is_empty() {
        let mut t = output::Table::new(&["ADJUSTED AT", ">AMOUNT CNY", "REASON"]);
        for a in &s.adjustments {
            t.row(vec![
                output::time(a.time_unix_ms),
                signed_cny(a.amount_fen),
                a.reason.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

fn statement_json(s: &Statement) -> Value {
    json!({
        "tenant": s.tenant,
        "month": s.month,
        "leases": s.leases,
        "cost_fen": s.cost_fen,
        "subsidy_fen": s.subsidy_fen,
        "due_fen": s.due_fen,
        "adjustments_fen": s.adjustments_fen,
        "adjustments": s.adjustments.iter().map(|a| json!({
            "time_unix_ms": a.time_unix_ms,
            "amount_fen": a.amount_fen,
            "reason": a.reason,
        })).collect::<Vec<_>>(),
        "payable_fen": s.payable_fen,
        "lines": s.lines.iter().map(|l| json!({
            "model": l.model,
            "pool_kind": output::pool_kind(l.pool_kind),
            "lease_parts": l.lease_parts,
            "milli_p_hours": l.milli_p_hours,
            "cost_fen": l.cost_fen,
            "subsidy_fen": l.subsidy_fen,
            "due_fen": l.due_fen,
        })).collect::<Vec<_>>(),
        "vouchers": s.vouchers.iter().map(|v| json!({
            "voucher": v.voucher,
            "rate_bp": v.rate_bp,
            "scope": v.scope,
            "issued_fen": v.issued_fen,
            "used_in_month_fen": v.used_in_month_fen,
            "remaining_fen": v.remaining_fen,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_rates_scopes_and_dates_parse_exactly_or_name_the_problem() {
        assert_eq!(yuan_fen("10000"), Ok(1_000_000));
        assert_eq!(yuan_fen("2500.5"), Ok(250_050));
        assert_eq!(yuan_fen("¥12.34"), Ok(1_234));
        for bad in ["", "1.234", "-5", "ten", "1e3", "99999999999999999999"] {
            assert!(yuan_fen(bad).is_err(), "{bad:?}");
        }
        assert_eq!(signed_yuan_fen("-12.50"), Ok(-1_250));
        assert_eq!(signed_yuan_fen("12.5"), Ok(1_250));
        for bad in ["-", "--5", "-ten", "- 5x"] {
            let e = signed_yuan_fen(bad).unwrap_err();
            assert!(e.contains("expected an amount in yuan"), "{bad:?}: {e}");
        }
        assert_eq!(rate_bp("50%"), Ok(5_000));
        assert_eq!(rate_bp("12.5%"), Ok(1_250));
        assert_eq!(rate_bp("100"), Ok(10_000));
        for bad in ["0%", "100.01%", "half"] {
            assert!(rate_bp(bad).is_err(), "{bad:?}");
        }
        assert_eq!(rate_text(1_250), "12.5%");
        assert_eq!(rate_text(5_000), "50%");
        assert_eq!(
            scope("pool:a, b").unwrap().pools,
            ["a".to_string(), "b".to_string()]
        );
        assert!(scope("all").unwrap().all_pools);
        assert_eq!(scope("local").unwrap().pool_kinds, [1, 2]);
        assert_eq!(scope("kind:external").unwrap().pool_kinds, [3]);
        assert!(scope("kind:moon").is_err());
        assert!(scope("pool:").is_err());
        // 2025-03-01 00:00 in China Standard Time is 2025-02-28 16:00 UTC.
        assert_eq!(
            date_ms("2025-03-01"),
            Ok(DateArg::At(
                suanli_billing::Month::new(2025, 3).unwrap().starts_at_ms() as u64
            ))
        );
        assert_eq!(date_ms("+1h"), Ok(DateArg::In(3_600_000)));
        assert!(date_ms("March").is_err());
        assert_eq!(month("2025-03"), Ok("2025-03".into()));
        assert!(month("2025-13").is_err());
    }
}
