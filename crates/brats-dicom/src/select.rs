//! Series selection: which series plays each of the four roles.
//!
//! A series is first *eligible* or not (MR image, not derived/localizer/projection/diffusion,
//! enough slices); eligible series are *scored* per role on description and protocol patterns,
//! the contrast agent and the sequence timing; each role takes its best-scoring series
//! (greedily, highest score first, one series per role), ties broken by 3D acquisition, then
//! the smallest voxel, then axial, then the most slices. A tie that survives all of these is an
//! error: guessing would be worse. Explicit overrides win over everything. Every score and
//! rejection is recorded with its reason, for `selection.json` and the job record.
//! SeriesDescription is unreliable across sites (MONAI Deploy App SDK #505), which is why the
//! timing rules weigh as much as the patterns; patterns are configurable.

use crate::error::DicomError;
use crate::phi::UidHasher;
use crate::scan::{Scan, Series};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The four inputs of the model, in its channel order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// T1 post-contrast.
    T1c,
    /// T1 native.
    T1n,
    /// T2-weighted.
    T2w,
    /// T2 FLAIR.
    T2f,
}

impl Role {
    /// All roles in channel order (T1c, T1, T2, FLAIR).
    pub const ALL: [Role; 4] = [Role::T1c, Role::T1n, Role::T2w, Role::T2f];

    /// The file-name form (`t1c`, `t1n`, `t2w`, `t2f`: BraTS 2023 names).
    pub fn name(self) -> &'static str {
        match self {
            Role::T1c => "t1c",
            Role::T1n => "t1n",
            Role::T2w => "t2w",
            Role::T2f => "t2f",
        }
    }

    /// The human form (`T1c`, `T1`, `T2`, `FLAIR`).
    pub fn label(self) -> &'static str {
        match self {
            Role::T1c => "T1c",
            Role::T1n => "T1",
            Role::T2w => "T2",
            Role::T2f => "FLAIR",
        }
    }

    /// Parses a role name (`t1c`, `t1`/`t1n`, `t2`/`t2w`, `flair`/`t2f`).
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "t1c" | "t1ce" | "t1gd" => Some(Role::T1c),
            "t1" | "t1n" => Some(Role::T1n),
            "t2" | "t2w" => Some(Role::T2w),
            "flair" | "t2f" => Some(Role::T2f),
            _ => None,
        }
    }
}

/// The configurable parts of selection. Patterns are case-insensitive regular expressions
/// matched against SeriesDescription and ProtocolName.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// FLAIR.
    pub flair: String,
    /// T1 post-contrast.
    pub t1_post: String,
    /// T1 (any).
    pub t1: String,
    /// T2 (any, FLAIR excluded by its own pattern).
    pub t2: String,
    /// Series that are never inputs (diffusion, perfusion, susceptibility, …).
    pub excluded: String,
    /// ImageType values that make a series ineligible.
    pub excluded_image_types: Vec<String>,
    /// Fewer slices than this: not a volume.
    pub min_slices: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            flair: r"FLAIR|TIRM|DARK.?FL|\bT2F\b".into(),
            t1_post: r"T1.*(\+\s*C|POST|GAD|\bGD\b|\bCE\b|CONTRAST|\bKM\b)|\bT1C\b|\bT1GD\b|MPRAGE.*(\+\s*C|POST|GD)".into(),
            t1: r"T1|MPRAGE|MP-RAGE|SPGR|BRAVO|TFE|\bT1N\b".into(),
            t2: r"T2|TSE|FSE|\bT2W\b".into(),
            excluded: r"DIFF|DWI|\bADC\b|TRACE|DTI|TENSOR|PERF|\bDSC\b|\bDCE\b|\bASL\b|SWI|SWAN|\bT2\*|BOLD|FMRI|SCOUT|LOCALI[ZS]ER|SURVEY|CALIBRATION|\bMIP\b|\bMPR\b|\bSUB(TRACTION)?\b".into(),
            excluded_image_types: ["DERIVED", "SECONDARY", "LOCALIZER", "PROJECTION IMAGE", "MPR", "MIP", "ADC", "TRACEW", "FA", "DIFFUSION", "SUBTRACT"]
                .map(String::from)
                .to_vec(),
            min_slices: 20,
        }
    }
}

/// Compiled [`Rules`].
#[derive(Debug, Clone)]
pub struct Selector {
    rules: Rules,
    flair: Regex,
    t1_post: Regex,
    t1: Regex,
    t2: Regex,
    excluded: Regex,
}

fn pattern(name: &str, p: &str) -> Result<Regex, String> {
    RegexBuilder::new(p).case_insensitive(true).build().map_err(|e| format!("selection rule {name}: {e}"))
}

impl Selector {
    /// Compiles the rules; an invalid pattern is named.
    pub fn new(rules: Rules) -> Result<Selector, String> {
        Ok(Selector {
            flair: pattern("flair", &rules.flair)?,
            t1_post: pattern("t1_post", &rules.t1_post)?,
            t1: pattern("t1", &rules.t1)?,
            t2: pattern("t2", &rules.t2)?,
            excluded: pattern("excluded", &rules.excluded)?,
            rules,
        })
    }

    /// Why `series` can play no role, or `None` when it is eligible.
    pub fn ineligible(&self, series: &Series) -> Option<String> {
        let s = series.first();
        if !s.is_mr_image() {
            return Some(if s.modality == "MR" {
                "not an MR image object".into()
            } else {
                format!("modality {}", or_none(&s.modality))
            });
        }
        if s.modality != "MR" {
            return Some(format!("modality {}", or_none(&s.modality)));
        }
        if let Some(t) = s.image_type.iter().find(|t| self.rules.excluded_image_types.iter().any(|x| x == *t)) {
            return Some(format!("image type {t}"));
        }
        if self.excluded.is_match(&s.series_description) || self.excluded.is_match(&s.protocol_name) {
            return Some(
                "description or protocol names a sequence that is not an input (diffusion, perfusion, localizer, …)"
                    .into(),
            );
        }
        let slices = series.frame_count();
        if slices < self.rules.min_slices {
            return Some(format!("{slices} slices, fewer than {}", self.rules.min_slices));
        }
        None
    }

    /// The score of `series` for `role`, with the reasons for each point.
    pub fn score(&self, series: &Series, role: Role) -> (i32, Vec<String>) {
        let s = series.first();
        let text = format!("{} {}", s.series_description, s.protocol_name);
        let mut score = 0;
        let mut why = Vec::new();
        let mut add = |points: i32, reason: &str| {
            score += points;
            why.push(format!("{points:+} {reason}"));
        };
        let (flair, t1_post, t1, t2) = (
            self.flair.is_match(&text),
            self.t1_post.is_match(&text),
            self.t1.is_match(&text),
            self.t2.is_match(&text),
        );
        let te = s.echo_time;
        let tr = s.repetition_time;
        let long_ti = s.inversion_time.is_some_and(|ti| ti > 1500.0);
        let t2_timing = te.is_some_and(|te| te > 80.0) && tr.is_some_and(|tr| tr > 2000.0);
        let t1_timing = te.is_some_and(|te| te < 30.0);
        match role {
            Role::T2f => {
                if flair {
                    add(4, "description/protocol matches the FLAIR pattern");
                }
                if long_ti && t2_timing {
                    add(4, "inversion recovery with TI > 1500 ms and long TE/TR (FLAIR timing)");
                } else if long_ti {
                    add(2, "inversion time > 1500 ms");
                }
                if t1_timing {
                    add(-4, "TE < 30 ms (T1 timing)");
                }
                if s.contrast {
                    add(-1, "contrast agent given");
                }
            }
            Role::T2w => {
                if t2 && !flair {
                    add(4, "description/protocol matches the T2 pattern");
                }
                if flair {
                    add(-4, "description/protocol matches the FLAIR pattern");
                }
                if t2_timing && !long_ti {
                    add(4, "TE > 80 ms and TR > 2000 ms without long inversion (T2 timing)");
                }
                if long_ti {
                    add(-4, "inversion time > 1500 ms (FLAIR timing)");
                }
                if t1_timing {
                    add(-4, "TE < 30 ms (T1 timing)");
                }
                if s.contrast {
                    add(-1, "contrast agent given");
                }
            }
            Role::T1c | Role::T1n => {
                let post = role == Role::T1c;
                if t1_post {
                    add(if post { 4 } else { -4 }, "description/protocol matches the T1 post-contrast pattern");
                } else if t1 && !flair {
                    add(if post { 1 } else { 4 }, "description/protocol matches the T1 pattern");
                }
                if s.contrast {
                    add(if post { 4 } else { -4 }, "ContrastBolusAgent present");
                } else if post && !t1_post {
                    add(-2, "no contrast agent recorded");
                }
                if t1_timing && !long_ti {
                    add(3, "TE < 30 ms (T1 timing)");
                }
                if t2_timing || long_ti || flair {
                    add(-4, "T2/FLAIR timing or description");
                }
            }
        }
        (score, why)
    }

    /// Tie-break key: 3D first, then the smallest voxel, then axial, then the most slices.
    fn tie_key(series: &Series) -> (bool, i64, bool, usize) {
        let s = series.first();
        let f = &s.frames[0];
        let voxel = f.spacing.map(|p| p[0] * p[1]).unwrap_or(f64::MAX);
        let axial = f.orientation.is_some_and(|o| {
            let n = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
            n[2].abs() > n[0].abs() && n[2].abs() > n[1].abs()
        });
        (s.acquisition_3d, -((voxel * 1e4) as i64), axial, series.frame_count())
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "(none)" } else { s }
}

/// How one role was filled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// Its hashed form (what logs and errors use).
    pub series_hash: String,
    /// Its score (0 for an override).
    pub score: i32,
    /// Why: each scoring rule that fired, or "override".
    pub reasons: Vec<String>,
}

/// A series that no role took, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// Its hashed form.
    pub series_hash: String,
    /// Why it was not taken.
    pub reason: String,
}

/// The outcome of selection: one series per role, and every other series with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// Role → choice.
    pub roles: BTreeMap<Role, Choice>,
    /// Series not taken.
    pub rejected: Vec<Rejection>,
}

impl Selection {
    /// The chosen series UID for `role`.
    pub fn uid(&self, role: Role) -> &str {
        &self.roles[&role].series_uid
    }
}

/// Chooses the four series. `overrides` maps roles to SeriesInstanceUIDs that win outright.
pub fn select(
    scan: &Scan,
    selector: &Selector,
    overrides: &BTreeMap<Role, String>,
    hasher: &UidHasher,
) -> Result<Selection, DicomError> {
    let mut roles: BTreeMap<Role, Choice> = BTreeMap::new();
    for (&role, uid) in overrides {
        if scan.get(uid).is_none() {
            return Err(DicomError::UnknownOverride {
                role,
                series: hasher.hash(uid),
                present: scan.series.iter().map(|s| hasher.hash(&s.uid)).collect(),
            });
        }
        roles.insert(
            role,
            Choice {
                series_uid: uid.clone(),
                series_hash: hasher.hash(uid),
                score: 0,
                reasons: vec!["override".into()],
            },
        );
    }
    let mut rejected: BTreeMap<String, String> = BTreeMap::new();
    let mut eligible = Vec::new();
    for s in &scan.series {
        if roles.values().any(|c| c.series_uid == s.uid) {
            continue;
        }
        match selector.ineligible(s) {
            Some(reason) => {
                rejected.insert(s.uid.clone(), reason);
            }
            None => eligible.push(s),
        }
    }
    // Every (role, series) pair with a positive score, best first.
    let mut pairs = Vec::new();
    for &role in Role::ALL.iter().filter(|r| !roles.contains_key(r)) {
        for s in &eligible {
            let (score, reasons) = selector.score(s, role);
            if score > 0 {
                pairs.push((score, Selector::tie_key(s), role, *s, reasons));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)).then_with(|| a.2.cmp(&b.2)));
    for (i, (score, key, role, series, reasons)) in pairs.iter().enumerate() {
        if roles.contains_key(role) || roles.values().any(|c| c.series_uid == series.uid) {
            continue;
        }
        // A tie: the next still-free series for this role with the same score and key.
        if let Some(other) = pairs[i + 1..]
            .iter()
            .find(|p| p.2 == *role && p.0 == *score && p.1 == *key && !roles.values().any(|c| c.series_uid == p.3.uid))
        {
            return Err(DicomError::Tie {
                role: *role,
                first: hasher.hash(&series.uid),
                second: hasher.hash(&other.3.uid),
                score: *score,
            });
        }
        roles.insert(
            *role,
            Choice {
                series_uid: series.uid.clone(),
                series_hash: hasher.hash(&series.uid),
                score: *score,
                reasons: reasons.clone(),
            },
        );
    }
    for role in Role::ALL {
        if !roles.contains_key(&role) {
            let candidates = scan
                .series
                .iter()
                .map(|s| {
                    let why = if let Some(r) = rejected.get(&s.uid) {
                        r.clone()
                    } else if let Some((taken, _)) = roles.iter().find(|(_, c)| c.series_uid == s.uid) {
                        format!("taken as {}", taken.label())
                    } else {
                        let (score, _) = selector.score(s, role);
                        format!("scores {score} for {} (needs > 0)", role.label())
                    };
                    format!("{} ({why})", hasher.hash(&s.uid))
                })
                .collect();
            return Err(DicomError::NoCandidate { role, candidates });
        }
    }
    let taken: Vec<&str> = roles.values().map(|c| c.series_uid.as_str()).collect();
    let rejected = scan
        .series
        .iter()
        .filter(|s| !taken.contains(&s.uid.as_str()))
        .map(|s| Rejection {
            series_uid: s.uid.clone(),
            series_hash: hasher.hash(&s.uid),
            reason: rejected.get(&s.uid).cloned().unwrap_or_else(|| "scored lower than the series chosen".into()),
        })
        .collect();
    Ok(Selection { roles, rejected })
}
