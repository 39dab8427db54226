//! The generic CSV trace: one job a line, a header naming the columns.
//!
//! Required columns: `submit_s,duration_s,devices,model,tenant`. Optional: `nodes`, `priority`
//! (`critical`, `standard`, `spot`; default standard), `shape` (`gang`, `elastic`; default gang)
//! and `deadline_s` (seconds after arrival by which the job must end). `model` empty or `any`
//! means any model of at least the reference size (see [`crate::job`]). Columns may come in any
//! order; unknown columns are an error, so a typo is not silently ignored.
//!
//! A bad row is an error naming its line and column. With `skip_bad_rows` the row is left out
//! and its error kept in [`Trace::skipped`], so a report can say how many were dropped and why.

use std::collections::BTreeMap;

use suanli_core::{Catalogue, Millis, Priority};

use crate::error::{RowError, SimError};
use crate::job::{Job, JobShape};

/// Longest accepted duration or deadline, in seconds (the engine's limit of one year).
const MAX_SECONDS: f64 = 366.0 * 24.0 * 3600.0;

/// Jobs read from a trace, sorted by arrival (ties keep file order).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The trace's name, for reports.
    pub name: String,
    /// Tenant names; a job's `tenant` indexes this list.
    pub tenants: Vec<String>,
    /// The jobs.
    pub jobs: Vec<Job>,
    /// Rows left out with `skip_bad_rows`, with their errors.
    pub skipped: Vec<RowError>,
}

impl Trace {
    /// An empty trace; [`Trace::tenant`] and `jobs.push` fill it.
    pub fn new(name: impl Into<String>) -> Self {
        Trace {
            name: name.into(),
            ..Trace::default()
        }
    }

    /// Sorts jobs by arrival, keeping the file order of equal arrivals.
    pub fn sort(&mut self) {
        self.jobs.sort_by_key(|j| j.submit_ms);
    }
}

/// Interns tenant names in first-seen order.
#[derive(Default)]
pub(crate) struct TenantNames {
    ids: BTreeMap<String, u32>,
    names: Vec<String>,
}

impl TenantNames {
    pub(crate) fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(name.to_string(), id);
        self.names.push(name.to_string());
        id
    }

    pub(crate) fn into_names(self) -> Vec<String> {
        self.names
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Column {
    Submit,
    Duration,
    Devices,
    Model,
    Tenant,
    Nodes,
    Priority,
    Shape,
    Deadline,
}

impl Column {
    const ALL: [(&'static str, Column, bool); 9] = [
        ("submit_s", Column::Submit, true),
        ("duration_s", Column::Duration, true),
        ("devices", Column::Devices, true),
        ("model", Column::Model, true),
        ("tenant", Column::Tenant, true),
        ("nodes", Column::Nodes, false),
        ("priority", Column::Priority, false),
        ("shape", Column::Shape, false),
        ("deadline_s", Column::Deadline, false),
    ];
}

/// Parses a CSV trace. `name` is used in errors.
pub fn parse_csv(
    name: &str,
    text: &str,
    catalogue: &Catalogue,
    skip_bad_rows: bool,
) -> Result<Trace, SimError> {
    let trace_err = |reason: String| SimError::Trace {
        trace: name.to_string(),
        reason,
    };
    let mut lines = text.lines().enumerate();
    let header = loop {
        match lines.next() {
            Some((_, l)) if l.trim().is_empty() => continue,
            Some((i, l)) => break (i + 1, l),
            None => return Err(trace_err("empty file: a header line is required".into())),
        }
    };
    let mut columns = Vec::new();
    for (i, raw) in header.1.split(',').enumerate() {
        let field = raw.trim().trim_start_matches('\u{feff}');
        let Some(&(_, col, _)) = Column::ALL.iter().find(|(n, _, _)| *n == field) else {
            return Err(SimError::Row {
                trace: name.to_string(),
                error: RowError {
                    line: header.0,
                    column: format!("#{}", i + 1),
                    reason: format!(
                        "unknown column {field:?} (expected submit_s,duration_s,devices,model,tenant and optionally nodes,priority,shape,deadline_s)"
                    ),
                },
            });
        };
        if columns.contains(&col) {
            return Err(trace_err(format!("column {field} appears twice")));
        }
        columns.push(col);
    }
    for (n, col, required) in Column::ALL {
        if required && !columns.contains(&col) {
            return Err(trace_err(format!("the header lacks the column {n}")));
        }
    }
    let mut tenants = TenantNames::default();
    let mut trace = Trace::new(name);
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(i + 1, line, &columns, catalogue, &mut tenants) {
            Ok(job) => trace.jobs.push(job),
            Err(error) if skip_bad_rows => trace.skipped.push(error),
            Err(error) => {
                return Err(SimError::Row {
                    trace: name.to_string(),
                    error,
                });
            }
        }
    }
    trace.tenants = tenants.into_names();
    if trace.jobs.is_empty() {
        return Err(trace_err("no jobs".into()));
    }
    trace.sort();
    Ok(trace)
}

fn column_name(col: Column) -> &'static str {
    Column::ALL
        .iter()
        .find(|(_, c, _)| *c == col)
        .map_or("?", |(n, _, _)| n)
}

fn parse_row(
    line: usize,
    text: &str,
    columns: &[Column],
    catalogue: &Catalogue,
    tenants: &mut TenantNames,
) -> Result<Job, RowError> {
    let fields: Vec<&str> = text.split(',').map(str::trim).collect();
    if fields.len() != columns.len() {
        let column = columns
            .get(fields.len().min(columns.len().saturating_sub(1)))
            .map_or("?".to_string(), |c| column_name(*c).to_string());
        return Err(RowError {
            line,
            column,
            reason: format!(
                "{} fields where the header has {}",
                fields.len(),
                columns.len()
            ),
        });
    }
    let err = |col: Column, reason: String| RowError {
        line,
        column: column_name(col).to_string(),
        reason,
    };
    let seconds = |col: Column, v: &str, allow_zero: bool| -> Result<Millis, RowError> {
        let s: f64 = v
            .parse()
            .map_err(|_| err(col, format!("{v:?} is not a number of seconds")))?;
        if !s.is_finite() || s < 0.0 || (!allow_zero && s == 0.0) || s > MAX_SECONDS {
            let least = if allow_zero { "0" } else { "more than 0" };
            return Err(err(
                col,
                format!("{v} is out of range ({least} up to {MAX_SECONDS} seconds)"),
            ));
        }
        Ok((s * 1000.0).round() as Millis)
    };
    let count = |col: Column, v: &str| -> Result<u32, RowError> {
        match v.parse::<u32>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err(err(
                col,
                format!("{v:?} is not a whole number from 1 to 1000000"),
            )),
        }
    };
    let mut job = Job {
        submit_ms: 0,
        duration_ms: 0,
        devices: 0,
        nodes: None,
        model: None,
        tenant: 0,
        priority: Priority::Standard,
        shape: JobShape::Gang,
        deadline_after_ms: None,
    };
    for (&col, &v) in columns.iter().zip(&fields) {
        match col {
            Column::Submit => job.submit_ms = seconds(col, v, true)?,
            Column::Duration => job.duration_ms = seconds(col, v, false)?.max(1),
            Column::Devices => job.devices = count(col, v)?,
            Column::Model => {
                job.model =
                    match v {
                        "" | "any" => None,
                        id => Some(catalogue.lookup(id).ok_or_else(|| {
                            err(col, format!("unknown accelerator model {id:?}"))
                        })?),
                    }
            }
            Column::Tenant => {
                if v.is_empty() {
                    return Err(err(col, "must not be empty".into()));
                }
                job.tenant = tenants.intern(v);
            }
            Column::Nodes => job.nodes = (!v.is_empty()).then(|| count(col, v)).transpose()?,
            Column::Priority => {
                job.priority = match v {
                    "" | "standard" => Priority::Standard,
                    "critical" => Priority::Critical,
                    "spot" => Priority::Spot,
                    other => {
                        return Err(err(
                            col,
                            format!("{other:?} is not critical, standard or spot"),
                        ));
                    }
                }
            }
            Column::Shape => {
                job.shape = match v {
                    "" | "gang" => JobShape::Gang,
                    "elastic" => JobShape::Elastic,
                    other => return Err(err(col, format!("{other:?} is not gang or elastic"))),
                }
            }
            Column::Deadline => {
                job.deadline_after_ms = (!v.is_empty())
                    .then(|| seconds(col, v, false))
                    .transpose()?
            }
        }
    }
    if let Some(nodes) = job.nodes {
        if job.shape == JobShape::Elastic {
            return Err(err(
                Column::Nodes,
                "an elastic job spans no fixed nodes: leave it empty".into(),
            ));
        }
        if !job.devices.is_multiple_of(nodes) {
            return Err(err(
                Column::Nodes,
                format!(
                    "{} devices do not split evenly over {nodes} nodes",
                    job.devices
                ),
            ));
        }
        let per_node = job.devices / nodes;
        if per_node > suanli_core::fleet::MAX_DEVICES_PER_NODE as u32 {
            return Err(err(
                Column::Nodes,
                format!(
                    "{per_node} devices per node is more than a node holds ({})",
                    suanli_core::fleet::MAX_DEVICES_PER_NODE
                ),
            ));
        }
    }
    if let Some(d) = job.deadline_after_ms
        && d < job.duration_ms
    {
        return Err(err(
            Column::Deadline,
            "the deadline comes before the job could finish".into(),
        ));
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Trace, SimError> {
        parse_csv("t.csv", text, &Catalogue::builtin(), false)
    }

    fn row_error(text: &str) -> RowError {
        match parse(text) {
            Err(SimError::Row { error, .. }) => error,
            other => panic!("expected a row error, got {other:?}"),
        }
    }

    const HEAD: &str = "submit_s,duration_s,devices,model,tenant\n";

    #[test]
    fn a_valid_trace_loads_sorted_with_optional_columns() {
        let t = parse(
            "tenant,submit_s,duration_s,devices,model,nodes,priority,shape,deadline_s\n\
             acme,10,60,16,h800,2,critical,gang,600\n\
             beta,5,30,4,any,,spot,elastic,\n\
             acme,5,1.5,1,,,,,\n",
        )
        .unwrap();
        assert_eq!(t.tenants, ["acme", "beta"]);
        assert_eq!(
            t.jobs.iter().map(|j| j.submit_ms).collect::<Vec<_>>(),
            [5000, 5000, 10_000]
        );
        let (beta, acme_small, acme_big) = (&t.jobs[0], &t.jobs[1], &t.jobs[2]);
        assert_eq!(
            (beta.shape, beta.priority, beta.model),
            (JobShape::Elastic, Priority::Spot, None)
        );
        assert_eq!(acme_small.duration_ms, 1500);
        assert_eq!(acme_big.nodes, Some(2));
        assert_eq!(acme_big.deadline_after_ms, Some(600_000));
        assert_eq!(acme_big.model, Catalogue::builtin().lookup("h800"));
    }

    #[test]
    fn bad_numbers_name_line_and_column() {
        let e = row_error(&format!("{HEAD}0,60,1,h800,a\n1,sixty,1,h800,a\n"));
        assert_eq!((e.line, e.column.as_str()), (3, "duration_s"));
        let e = row_error(&format!("{HEAD}-1,60,1,h800,a\n"));
        assert_eq!((e.line, e.column.as_str()), (2, "submit_s"));
        let e = row_error(&format!("{HEAD}0,0,1,h800,a\n"));
        assert_eq!(e.column, "duration_s");
        let e = row_error(&format!("{HEAD}0,60,0,h800,a\n"));
        assert_eq!(e.column, "devices");
        let e = row_error(&format!("{HEAD}0,NaN,1,h800,a\n"));
        assert_eq!(e.column, "duration_s");
    }

    #[test]
    fn unknown_values_name_their_column() {
        let e = row_error(&format!("{HEAD}0,60,1,h999,a\n"));
        assert_eq!(e.column, "model");
        assert!(e.reason.contains("h999"), "{e}");
        let e = row_error(&format!("{HEAD}0,60,1,h800,\n"));
        assert_eq!(e.column, "tenant");
        let e = row_error("submit_s,duration_s,devices,model,tenant,priority\n0,60,1,,a,urgent\n");
        assert_eq!(e.column, "priority");
        let e = row_error("submit_s,duration_s,devices,model,tenant,shape\n0,60,1,,a,blob\n");
        assert_eq!(e.column, "shape");
    }

    #[test]
    fn shape_errors_name_nodes_and_deadline() {
        let h = "submit_s,duration_s,devices,model,tenant,nodes,deadline_s\n";
        let e = row_error(&format!("{h}0,60,10,,a,3,\n"));
        assert_eq!((e.line, e.column.as_str()), (2, "nodes"));
        let e = row_error(&format!("{h}0,60,64,,a,2,\n"));
        assert_eq!(e.column, "nodes");
        let e = row_error(&format!("{h}0,60,8,,a,1,30\n"));
        assert_eq!(e.column, "deadline_s");
    }

    #[test]
    fn short_rows_and_bad_headers_are_errors() {
        let e = row_error(&format!("{HEAD}0,60,1\n"));
        assert_eq!((e.line, e.column.as_str()), (2, "model"));
        let e = row_error("submit_s,duration_s,devices,model,tenant,colour\n");
        assert_eq!((e.line, e.column.as_str()), (1, "#6"));
        assert!(matches!(
            parse("submit_s,duration_s,devices,model\n0,1,1,a\n"),
            Err(SimError::Trace { reason, .. }) if reason.contains("tenant")
        ));
        assert!(matches!(parse(""), Err(SimError::Trace { .. })));
        assert!(matches!(parse(HEAD), Err(SimError::Trace { reason, .. }) if reason == "no jobs"));
    }

    #[test]
    fn skipping_bad_rows_counts_and_keeps_their_errors() {
        let text = format!("{HEAD}0,60,1,h800,a\n1,x,1,h800,a\n2,60,1,h999,b\n3,60,2,,c\n");
        let t = parse_csv("t.csv", &text, &Catalogue::builtin(), true).unwrap();
        assert_eq!(t.jobs.len(), 2);
        assert_eq!(
            t.skipped
                .iter()
                .map(|e| (e.line, e.column.as_str()))
                .collect::<Vec<_>>(),
            [(3, "duration_s"), (4, "model")]
        );
        assert_eq!(t.tenants, ["a", "c"]);
    }
}
