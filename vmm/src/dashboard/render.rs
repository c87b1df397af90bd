//! Drawing the dashboard: a header, the pool's bars, the partition table, the selected
//! partition's sparklines, the footer.

use ratatui::backend::TestBackend;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table};
use ratatui::{Frame, Terminal};

use super::{rate_text, Dashboard, Rates, WEIGHT_STEP};
use crate::control::{PartitionState, PoolSnapshot, Snapshot, PAGE_SIZE};

/// Partition colours, in table order (and round again).
const PALETTE: [Color; 8] =
    [Color::Cyan, Color::Green, Color::Yellow, Color::Magenta, Color::Blue, Color::LightRed, Color::LightGreen, Color::LightBlue];

/// The table's columns. Every heading is one word, and so is every cell but the last.
const HEADINGS: [&str; 13] = [
    "name",
    "state",
    "weight",
    "policy",
    "pmem",
    "loan",
    "loan-tgt",
    "hpi/s",
    "hpit-ms",
    "po/s",
    "vpg/s",
    "fail",
    "vpg/s-history",
];

/// Columns left out, in this order, when the screen is too narrow for the table:
/// hpit-ms, loan-tgt, state, policy.
const DROP_ORDER: [usize; 4] = [8, 6, 1, 3];

/// Rows of the selected partition's panel (border, a line of figures, sparklines).
const DETAIL_HEIGHT: u16 = 7;

fn colour(i: usize) -> Color {
    PALETTE[i % PALETTE.len()]
}

fn mib(pages: u64) -> f64 {
    (pages * PAGE_SIZE) as f64 / (1u64 << 20) as f64
}

impl Dashboard {
    /// Draw the whole screen into `f`.
    pub fn render(&self, f: &mut Frame) {
        let area = f.area();
        let Some(s) = &self.snap else {
            let [head, _, footer] =
                Layout::vertical([Constraint::Length(1), Constraint::Min(0), Constraint::Length(2)]).areas(area);
            f.render_widget(Paragraph::new("amsvm: waiting for the first snapshot..."), head);
            f.render_widget(self.footer(), footer);
            return;
        };
        let pool_h = if s.pool.is_some() { 5 } else { 1 };
        let table_h = s.partitions.len() as u16 + 2;
        let detail_h = if !s.partitions.is_empty() && area.height >= 1 + pool_h + 1 + table_h + DETAIL_HEIGHT + 2 {
            DETAIL_HEIGHT
        } else {
            0
        };
        let [head, pool, _, table, detail, _, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(pool_h),
            Constraint::Length(1),
            Constraint::Length(table_h),
            Constraint::Length(detail_h),
            Constraint::Fill(1),
            Constraint::Length(2),
        ])
        .areas(area);
        f.render_widget(Paragraph::new(header(s)), head);
        f.render_widget(Paragraph::new(pool_lines(s, pool.width)), pool);
        f.render_widget(self.table(s, table.width), table);
        if detail_h > 0 {
            self.render_detail(f, s, detail);
        }
        f.render_widget(self.footer(), footer);
    }

    /// The partition table. On a screen narrower than the table, the columns of
    /// [`DROP_ORDER`] go first; the history column gets whatever is left.
    fn table(&self, s: &Snapshot, width: u16) -> Table<'static> {
        let cells: Vec<[String; 12]> = s
            .partitions
            .iter()
            .map(|p| {
                let r = self.rates(&p.name);
                [
                    super::one_line(&p.name),
                    p.state.to_string(),
                    p.weight.to_string(),
                    p.loan_policy.to_string(),
                    format!("{:.1}", p.pmem_mib()),
                    format!("{:.1}", p.loan_mib()),
                    format!("{:.1}", p.loan_target_mib()),
                    rate_text(r.map(|r| r.hpi)),
                    format!("{:.1}", p.hpit_ms),
                    rate_text(r.map(|r| r.page_outs)),
                    rate_text(r.map(|r| r.verified)),
                    p.verify_failures.to_string(),
                ]
            })
            .collect();
        let widths: Vec<u16> = (0..12)
            .map(|c| cells.iter().map(|row| row[c].chars().count()).chain([HEADINGS[c].len()]).max().unwrap_or(0) as u16)
            .collect();
        // Each column takes its width and a gap.
        let needed = |cols: &[usize]| cols.iter().map(|&c| widths[c] + 1).sum::<u16>();
        let mut cols: Vec<usize> = (0..12).collect();
        for drop in DROP_ORDER {
            if needed(&cols) <= width {
                break;
            }
            cols.retain(|&c| c != drop);
        }
        let spark_w = width.saturating_sub(needed(&cols)) as usize;
        // Name, state and policy are words; the others numbers.
        let align = |c: usize| if matches!(c, 0 | 1 | 3 | 12) { Alignment::Left } else { Alignment::Right };
        let header = Row::new(cols.iter().chain([&12]).map(|&c| Cell::from(Line::from(HEADINGS[c]).alignment(align(c)))))
            .style(Style::new().add_modifier(Modifier::BOLD));
        let rows = s.partitions.iter().zip(cells).enumerate().map(|(i, (p, row))| {
            let history: Vec<u64> = self.history(&p.name).iter().map(|r| r.verified).collect();
            let mut cs: Vec<Cell> = cols
                .iter()
                .map(|&c| {
                    let style = match c {
                        0 => Style::new().fg(colour(i)),
                        1 => state_style(p.state),
                        11 if p.verify_failures > 0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                        _ => Style::new(),
                    };
                    Cell::from(Line::from(row[c].clone()).alignment(align(c))).style(style)
                })
                .collect();
            cs.push(Cell::from(spark_text(&history[history.len().saturating_sub(spark_w)..])).style(Style::new().fg(colour(i))));
            let row = Row::new(cs);
            if i == self.selected {
                row.style(Style::new().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        });
        let constraints = cols.iter().map(|&c| Constraint::Length(widths[c])).chain([Constraint::Fill(1)]);
        Table::new(rows, constraints).header(header).column_spacing(1).block(
            Block::new()
                .borders(Borders::TOP)
                .title(" per partition: MiB; rates per second over the last interval; hpit-ms cumulative "),
        )
    }

    /// The selected partition's figures and its hpi/s and page-outs/s sparklines.
    fn render_detail(&self, f: &mut Frame, s: &Snapshot, area: Rect) {
        let Some(p) = s.partitions.get(self.selected) else { return };
        let block = Block::bordered().title(format!(" {}: {} ", p.name, p.state_text()));
        let inner = block.inner(area);
        f.render_widget(block, area);
        let [info, sparks] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
        f.render_widget(
            Paragraph::new(format!(
                "logical {} MiB, min {} MiB, zero-fills {}, cluster reads {}, pager {:.1} MiB, resets {}, rejected {}",
                p.logical_mib,
                p.min_mib,
                p.zero_fills,
                p.cluster_reads,
                p.pager_mib(),
                p.resets,
                p.rejected
            )),
            info,
        );
        let history = self.history(&p.name);
        let [left, right] = Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)]).spacing(2).areas(sparks);
        let spark = |name: &str, pick: fn(&Rates) -> u64, area: Rect, c: Color| {
            let data: Vec<u64> = history[history.len().saturating_sub(area.width as usize)..].iter().map(pick).collect();
            let now = rate_text(history.last().map(pick));
            let max = data.iter().max().copied().unwrap_or(0);
            Sparkline::default()
                .block(Block::new().title(format!("{name} now {now}, max {max} (last {} s)", data.len())))
                .style(Style::new().fg(c))
                .data(data)
        };
        f.render_widget(spark("hpi/s", |r| r.hpi, left, Color::Yellow), left);
        f.render_widget(spark("page-outs/s", |r| r.page_outs, right, Color::Magenta), right);
    }

    /// The keys, and the status line.
    fn footer(&self) -> Paragraph<'static> {
        let key = |k: &str| Span::styled(k.to_string(), Style::new().add_modifier(Modifier::BOLD));
        let keys = Line::from(vec![
            key("Up/Down j/k"),
            Span::raw(" select  "),
            key("+/-"),
            Span::raw(format!(" weight ±{WEIGHT_STEP}  ")),
            key("l"),
            Span::raw(" loan policy  "),
            key("q"),
            Span::raw(" quit"),
        ]);
        let style = if self.status_is_error() { Style::new().fg(Color::Red) } else { Style::new().fg(Color::Green) };
        Paragraph::new(vec![keys, Line::styled(self.status().to_string(), style)])
    }
}

fn state_style(s: PartitionState) -> Style {
    match s {
        PartitionState::Running => Style::new(),
        PartitionState::Paused => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        PartitionState::Ended => Style::new().fg(Color::DarkGray),
    }
}

/// `amsvm pid 1234, up 12.0 s, ...`
fn header(s: &Snapshot) -> Line<'static> {
    let mut spans = vec![
        Span::styled("amsvm", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(" pid {}, up {:.1} s", s.pid, s.uptime_ms as f64 / 1000.0)),
    ];
    if s.control_requests > 0 {
        spans.push(Span::raw(format!(", control: {} requests, {} rejected", s.control_requests, s.control_rejected)));
    }
    if let Some(ps) = &s.paging_server {
        spans.push(Span::raw(format!(
            ", paging server: {} start{}, {} requests, {} resubmitted, {} I/O errors",
            ps.starts,
            if ps.starts == 1 { "" } else { "s" },
            ps.requests,
            ps.resubmitted,
            ps.io_errors
        )));
    }
    Line::from(spans)
}

/// The pool: its figures; a bar of its frames (resident pages of each partition,
/// frames in use not counted by any partition, free frames) with a legend; a bar of
/// the partitions' logical memory (resident, loaned, neither) with a legend. Loaned
/// pages are not resident: the guests gave them back and the pool reused the frames,
/// so they appear in the second bar, not the first.
fn pool_lines(s: &Snapshot, width: u16) -> Vec<Line<'static>> {
    let Some(pool) = &s.pool else {
        return vec![Line::raw("pool: none (each partition has its own RAM)")];
    };
    const LABEL: &str = "frames ";
    let bar_w = (width as usize).saturating_sub(LABEL.len() + 2);
    let pmem_sum: u64 = s.partitions.iter().map(|p| p.pmem_pages).sum();
    let other = pool.in_use_pages.saturating_sub(pmem_sum);

    // The frames.
    let other_style = Style::new().fg(Color::Gray);
    let free_style = Style::new().fg(Color::DarkGray);
    let mut segs: Vec<(u64, Style, &str)> =
        s.partitions.iter().enumerate().map(|(i, p)| (p.pmem_pages, Style::new().fg(colour(i)), "█")).collect();
    segs.push((other, other_style, "▓"));
    segs.push((pool.free_pages, free_style, "░"));
    let mut frames = vec![Span::raw(LABEL), Span::raw("[")];
    frames.extend(bar(&segs, bar_w));
    frames.push(Span::raw("]"));
    let mut legend = vec![Span::raw(" ".repeat(LABEL.len() + 1))];
    for (i, p) in s.partitions.iter().enumerate() {
        legend.push(Span::styled("█", Style::new().fg(colour(i))));
        legend.push(Span::raw(format!(" {} {:.1}  ", super::one_line(&p.name), p.pmem_mib())));
    }
    if other > 0 {
        legend.push(Span::styled("▓", other_style));
        legend.push(Span::raw(format!(" other {:.1}  ", mib(other))));
    }
    legend.push(Span::styled("░", free_style));
    legend.push(Span::raw(format!(" free {:.1}", pool.free_mib())));

    // The partitions' logical memory.
    let logical: u64 = s.partitions.iter().map(|p| p.logical_mib * ((1 << 20) / PAGE_SIZE)).sum();
    let loan_sum: u64 = s.partitions.iter().map(|p| p.loan_pages).sum();
    let elsewhere = logical.saturating_sub(pmem_sum + loan_sum);
    let (res_style, loan_style) = (Style::new().fg(Color::Green), Style::new().fg(Color::Yellow));
    let segs = [(pmem_sum, res_style, "█"), (loan_sum, loan_style, "▒"), (elsewhere, free_style, "·")];
    let mut guests = vec![Span::raw("guests "), Span::raw("[")];
    guests.extend(bar(&segs, bar_w));
    guests.push(Span::raw("]"));
    let guest_legend = vec![
        Span::raw(" ".repeat(LABEL.len() + 1)),
        Span::styled("█", res_style),
        Span::raw(format!(" resident {:.1}  ", mib(pmem_sum))),
        Span::styled("▒", loan_style),
        Span::raw(format!(" loaned {:.1} (given back, not resident)  ", mib(loan_sum))),
        Span::styled("·", free_style),
        Span::raw(format!(" paged out or untouched {:.1}  of {:.1} logical", mib(elsewhere), mib(logical))),
    ];
    vec![Line::from(pool_title(pool)), Line::from(frames), Line::from(legend), Line::from(guests), Line::from(guest_legend)]
}

fn pool_title(p: &PoolSnapshot) -> Vec<Span<'static>> {
    vec![
        Span::styled("pool", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            " {:.1} MiB: in use {:.1}, free {:.1}, peak {:.1}; faults {}, reclaims {}, frame waits {}",
            p.size_mib(),
            p.in_use_mib(),
            p.free_mib(),
            mib(p.peak_in_use_pages),
            p.faults,
            p.reclaims,
            p.frame_waits
        )),
    ]
}

/// A bar `width` cells wide, each segment's share of the total (largest remainders get
/// the cells rounding leaves over, so the bar is always full unless the total is 0).
pub(super) fn bar(segs: &[(u64, Style, &'static str)], width: usize) -> Vec<Span<'static>> {
    let total: u128 = segs.iter().map(|s| s.0 as u128).sum();
    if total == 0 {
        return vec![Span::raw(" ".repeat(width))];
    }
    let exact: Vec<(usize, u128)> = segs
        .iter()
        .map(|s| {
            let x = s.0 as u128 * width as u128;
            ((x / total) as usize, x % total)
        })
        .collect();
    let mut cells: Vec<usize> = exact.iter().map(|e| e.0).collect();
    let mut order: Vec<usize> = (0..segs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(exact[i].1));
    let left = width - cells.iter().sum::<usize>();
    for &i in order.iter().take(left) {
        cells[i] += 1;
    }
    segs.iter().zip(cells).filter(|(_, n)| *n > 0).map(|(s, n)| Span::styled(s.2.repeat(n), s.1)).collect()
}

/// A text sparkline, one character per value, scaled to the largest (0 is `▁`, any
/// other value at least `▂`).
pub(super) fn spark_text(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().max().copied().unwrap_or(0).max(1) as u128;
    values.iter().map(|&v| if v == 0 { BARS[0] } else { BARS[(v as u128 * 7).div_ceil(max).min(7) as usize] }).collect()
}

/// The screen as text: `d` rendered on a `width` x `height` [`TestBackend`], one line
/// per row with trailing blanks removed. The table has one row per partition, starting
/// with its name, every cell one word:
/// `name state weight policy pmem loan loan-tgt hpi/s hpit-ms po/s vpg/s fail vpg/s-history`
/// (numbers formatted as the [module](super) says). Give at least 120 columns so that
/// no column is cut.
pub fn render_to_text(d: &Dashboard, width: u16, height: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(width, height)).expect("a TestBackend never fails");
    t.draw(|f| d.render(f)).expect("a TestBackend never fails");
    let buf = t.backend().buffer();
    (0..height)
        .map(|y| {
            let line: String = (0..width).filter_map(|x| buf.cell((x, y)).map(|c| c.symbol().to_string())).collect();
            line.trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}
