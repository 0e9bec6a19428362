//! Window reports: the settlement report as JSON and CSV, and a chart of net positions as SVG.

use serde::{Deserialize, Serialize};

use crate::export::Checkpoint;
use crate::netting::SettlementPlan;

pub mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

pub mod i128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &i128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A disagreement found by reconciliation: what was compared, and the two sides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Break {
    pub check: String,
    pub subject: String,
    pub expected: String,
    pub found: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowState {
    Open,
    Closed,
    Settled,
}

/// Everything known about one window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowReport {
    pub window: u64,
    pub state: WindowState,
    pub opened_at_ns: u64,
    pub closed_at_ns: Option<u64>,
    pub settled_at_ns: Option<u64>,
    /// The `window_closed` voucher and the operator's signature over the chain head there.
    pub checkpoint: Option<Checkpoint>,
    pub plan: Option<SettlementPlan>,
    /// Net receivers whose position could not give back all of their net at settlement (they had
    /// spent the receipts in the next window): participant, currency, amount carried in minor
    /// units.
    #[serde(default, rename = "carried_minor_units", alias = "carried")]
    pub carried: Vec<(String, String, String)>,
    /// Internal reconciliation at settlement: empty when everything agreed.
    #[serde(default)]
    pub breaks: Vec<Break>,
    #[serde(default)]
    pub reconciled: bool,
}

impl WindowReport {
    /// One CSV row per participant and currency, after a header row.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "window,participant,currency,model,sent,sent_count,received,received_count,net,peak_exposure,instruction\n",
        );
        if let Some(plan) = &self.plan {
            for p in &plan.positions {
                let instruction = if !p.deferred || p.net == 0 {
                    "none".to_string()
                } else if p.net < 0 {
                    format!("pay {}", p.net.unsigned_abs())
                } else {
                    format!("receive {}", p.net)
                };
                out.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{},{}\n",
                    self.window,
                    p.participant,
                    p.currency,
                    if p.deferred {
                        "deferred_net"
                    } else {
                        "prefunded"
                    },
                    p.sent,
                    p.sent_count,
                    p.received,
                    p.received_count,
                    p.net,
                    p.peak_exposure,
                    instruction
                ));
            }
        }
        out
    }

    /// A horizontal bar chart of net positions per participant (first currency), self-contained
    /// SVG with no external references.
    pub fn to_svg(&self) -> String {
        let positions: Vec<_> = self
            .plan
            .iter()
            .flat_map(|plan| plan.positions.iter())
            .collect();
        let row = 18u32;
        let width = 720u32;
        let label = 140u32;
        let height = 40 + row * positions.len().max(1) as u32;
        let largest = positions
            .iter()
            .map(|p| p.net.unsigned_abs())
            .max()
            .unwrap_or(0)
            .max(1);
        let half = (width - label - 20) / 2;
        let middle = label + half;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n<title>Window {} net positions</title>\n<text x=\"4\" y=\"16\" font-size=\"13\">Window {} net positions (minor units; right = receives, left = pays)</text>\n<line x1=\"{middle}\" y1=\"24\" x2=\"{middle}\" y2=\"{height}\" stroke=\"#888\"/>\n",
            self.window, self.window
        );
        for (i, p) in positions.iter().enumerate() {
            let y = 28 + row * i as u32;
            // Integer scaling: bar length in pixels, proportional to |net|.
            let length = (p.net.unsigned_abs().saturating_mul(half as u128) / largest) as u32;
            let (x, color) = if p.net < 0 {
                (middle - length, "#c0392b")
            } else {
                (middle, "#27ae60")
            };
            svg.push_str(&format!(
                "<text x=\"4\" y=\"{}\">{} {}</text><rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{color}\"><title>{} {} net {}</title></rect>\n",
                y + 12,
                xml_escape(&p.participant),
                xml_escape(&p.currency),
                length.max(1),
                row - 4,
                xml_escape(&p.participant),
                xml_escape(&p.currency),
                p.net
            ));
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
