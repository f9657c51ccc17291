//! Synthetic MIMIC-IV-shaped releases (hosp/ + note/discharge) for tests and the import
//! benchmark: the real schema and quoting (multi-line notes with commas and quotes), made-up
//! patients. The credentialed notes module cannot be obtained here, so tests write this one.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};

use crate::StoreError;

#[derive(Debug, Clone, Copy)]
pub struct SyntheticMimic {
    pub patients: u64,
    /// Admissions per patient are 1 + (this many on average, spread 0..2×).
    pub extra_admissions_per_patient: f64,
    /// Share of admissions with a discharge note.
    pub note_share: f64,
    /// Average characters per discharge note.
    pub note_chars: usize,
    pub diagnoses_per_admission: u32,
    pub procedures_per_admission: u32,
    /// Share of admissions coded in ICD-9.
    pub icd9_share: f64,
    pub seed: u64,
}

impl SyntheticMimic {
    /// A few dozen patients: enough for every code path, small enough for a unit test.
    pub fn small() -> Self {
        Self {
            patients: 40,
            extra_admissions_per_patient: 0.5,
            note_share: 0.75,
            note_chars: 1_500,
            diagnoses_per_admission: 8,
            procedures_per_admission: 2,
            icd9_share: 0.2,
            seed: 7,
        }
    }

    /// The full MIMIC-IV scale: ~300k patients, ~430k admissions, ~330k discharge notes of
    /// ~10 kB, ~6M diagnosis rows.
    pub fn full_scale() -> Self {
        Self {
            patients: 300_000,
            extra_admissions_per_patient: 0.43,
            note_share: 0.77,
            note_chars: 10_000,
            diagnoses_per_admission: 14,
            procedures_per_admission: 2,
            icd9_share: 0.45,
            seed: 7,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyntheticCounts {
    pub patients: u64,
    pub admissions: u64,
    pub notes: u64,
    pub diagnosis_rows: u64,
    pub procedure_rows: u64,
    pub bytes_written: u64,
}

const ICD10_DIAGNOSES: &[(&str, &str)] = &[
    ("E119", "Type 2 diabetes mellitus without complications"),
    ("I10", "Essential (primary) hypertension"),
    ("E785", "Hyperlipidemia, unspecified"),
    ("N179", "Acute kidney failure, unspecified"),
    ("J189", "Pneumonia, unspecified organism"),
    ("I509", "Heart failure, unspecified"),
    ("A419", "Sepsis, unspecified organism"),
    ("N390", "Urinary tract infection, site not specified"),
    ("I4891", "Unspecified atrial fibrillation"),
    ("J449", "Chronic obstructive pulmonary disease, unspecified"),
    ("K219", "Gastro-esophageal reflux disease without esophagitis"),
    ("F329", "Major depressive disorder, single episode, unspecified"),
    ("E1140", "Type 2 diabetes mellitus with diabetic neuropathy, unspecified"),
    ("Z794", "Long term (current) use of insulin"),
    ("S72001A", "Fracture of unspecified part of neck of right femur, initial encounter for closed fracture"),
    ("R079", "Chest pain, unspecified"),
];
const ICD10_PROCEDURES: &[(&str, &str)] = &[
    (
        "0DTJ4ZZ",
        "Resection of Appendix, Percutaneous Endoscopic Approach",
    ),
    (
        "0FT44ZZ",
        "Resection of Gallbladder, Percutaneous Endoscopic Approach",
    ),
    (
        "02HV33Z",
        "Insertion of Infusion Device into Superior Vena Cava, Percutaneous Approach",
    ),
    (
        "5A1955Z",
        "Respiratory Ventilation, Greater than 96 Consecutive Hours",
    ),
];
const ICD9_DIAGNOSES: &[(&str, &str)] = &[
    ("4019", "Unspecified essential hypertension"),
    ("25000", "Diabetes mellitus without mention of complication"),
    ("4280", "Congestive heart failure, unspecified"),
    ("5849", "Acute kidney failure, unspecified"),
];
const ICD9_PROCEDURES: &[(&str, &str)] =
    &[("3893", "Venous catheterization, not elsewhere classified")];

const SENTENCES: &[&str] = &[
    "Patient presented with shortness of breath, fatigue and bilateral lower extremity edema.",
    "Blood glucose was elevated on admission; insulin sliding scale was started.",
    "Chest X-ray showed a right lower lobe consolidation, consistent with pneumonia.",
    "He was started on IV antibiotics and improved over the next 48 hours.",
    "Creatinine peaked at 2.1 and returned to baseline after \"gentle\" IV fluids.",
    "Home medications: metformin 500 mg BID, lisinopril 10 mg daily, atorvastatin 40 mg.",
    "Discharge condition: stable, ambulating with a walker.",
    "Follow-up with primary care in one week, cardiology in 4-6 weeks.",
];

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct GzCsv {
    encoder: GzEncoder<std::io::BufWriter<std::fs::File>>,
    path: PathBuf,
}

impl GzCsv {
    fn create(path: PathBuf, header: &str) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let file = fs_err::File::create(&path)?.into_parts().0;
        let mut encoder = GzEncoder::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            Compression::fast(),
        );
        writeln!(encoder, "{header}")?;
        Ok(Self { encoder, path })
    }

    fn finish(self) -> Result<u64, StoreError> {
        self.encoder.finish()?.flush()?;
        Ok(fs_err::metadata(&self.path)?.len())
    }
}

/// Made-up words of 1 to 4 syllables.
fn pseudo_words(rng: &mut Rng, n: usize) -> Vec<String> {
    const ONSETS: &[&str] = &[
        "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr", "ph",
        "ch",
    ];
    const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ia", "eo", "ou"];
    const CODAS: &[&str] = &["", "", "n", "r", "s", "l", "x", "m", "t"];
    (0..n)
        .map(|_| {
            (0..1 + rng.below(4))
                .map(|_| {
                    format!(
                        "{}{}{}",
                        ONSETS[rng.below(ONSETS.len())],
                        VOWELS[rng.below(VOWELS.len())],
                        CODAS[rng.below(CODAS.len())]
                    )
                })
                .collect()
        })
        .collect()
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// Write a synthetic MIMIC-IV release under `dir` (`hosp/*.csv.gz`, `note/discharge.csv.gz`).
pub fn write_synthetic_mimic_iv(
    dir: &Path,
    spec: &SyntheticMimic,
) -> Result<SyntheticCounts, StoreError> {
    let mut rng = Rng(spec.seed);
    let mut counts = SyntheticCounts::default();
    let mut patients = GzCsv::create(
        dir.join("hosp/patients.csv.gz"),
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
    )?;
    let mut admissions = GzCsv::create(
        dir.join("hosp/admissions.csv.gz"),
        "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admission_location,discharge_location,insurance,race,hospital_expire_flag",
    )?;
    let mut diagnoses = GzCsv::create(
        dir.join("hosp/diagnoses_icd.csv.gz"),
        "subject_id,hadm_id,seq_num,icd_code,icd_version",
    )?;
    let mut procedures = GzCsv::create(
        dir.join("hosp/procedures_icd.csv.gz"),
        "subject_id,hadm_id,seq_num,chartdate,icd_code,icd_version",
    )?;
    let mut notes = GzCsv::create(
        dir.join("note/discharge.csv.gz"),
        "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text",
    )?;
    let vocabulary = pseudo_words(&mut rng, 4_000);
    let mut hadm_id: u64 = 20_000_000;
    for p in 0..spec.patients {
        let subject_id = 10_000_000 + p;
        let gender = if rng.unit() < 0.5 { "F" } else { "M" };
        writeln!(
            patients.encoder,
            "{subject_id},{gender},{},2150,2011 - 2013,",
            18 + rng.below(70)
        )?;
        counts.patients += 1;
        let extra = (rng.unit() * 2.0 * spec.extra_admissions_per_patient).round() as u64;
        for a in 0..=extra {
            hadm_id += 1 + rng.below(50) as u64;
            let day = 1 + rng.below(27);
            writeln!(
                admissions.encoder,
                "{subject_id},{hadm_id},2150-0{m}-{day:02} 08:00:00,2150-0{m}-{d2:02} 14:00:00,,URGENT,EMERGENCY ROOM,HOME,Medicare,WHITE,0",
                m = 1 + a % 8,
                d2 = day + 1
            )?;
            counts.admissions += 1;
            let icd9 = rng.unit() < spec.icd9_share;
            let (dx_pool, px_pool, version) = if icd9 {
                (ICD9_DIAGNOSES, ICD9_PROCEDURES, 9)
            } else {
                (ICD10_DIAGNOSES, ICD10_PROCEDURES, 10)
            };
            let n_dx = 1 + rng.below(2 * spec.diagnoses_per_admission as usize - 1);
            for seq in 1..=n_dx {
                let (code, _) = dx_pool[rng.below(dx_pool.len())];
                writeln!(
                    diagnoses.encoder,
                    "{subject_id},{hadm_id},{seq},{code},{version}"
                )?;
                counts.diagnosis_rows += 1;
            }
            let n_px = rng.below(2 * spec.procedures_per_admission as usize + 1);
            for seq in 1..=n_px {
                let (code, _) = px_pool[rng.below(px_pool.len())];
                writeln!(
                    procedures.encoder,
                    "{subject_id},{hadm_id},{seq},2150-01-02,{code},{version}"
                )?;
                counts.procedure_rows += 1;
            }
            if rng.unit() < spec.note_share {
                let mut text = String::with_capacity(spec.note_chars + 200);
                text.push_str(
                    "Name:  ___                     Unit No:   ___\n\nChief Complaint:\n",
                );
                while text.len() < spec.note_chars {
                    // Mostly varied words, so that the text compresses like real notes do
                    // (a few templated sentences alone would gzip 20:1 and flatter the reader).
                    if rng.unit() < 0.15 {
                        text.push_str(SENTENCES[rng.below(SENTENCES.len())]);
                    } else {
                        for w in 0..6 + rng.below(12) {
                            if w > 0 {
                                text.push(' ');
                            }
                            text.push_str(&vocabulary[rng.below(vocabulary.len())]);
                        }
                        text.push_str(if rng.unit() < 0.1 {
                            ", \"noted\"."
                        } else {
                            "."
                        });
                    }
                    text.push(if rng.unit() < 0.2 { '\n' } else { ' ' });
                }
                writeln!(
                    notes.encoder,
                    "{subject_id}-DS-{a},{subject_id},{hadm_id},DS,{a},2150-01-05 00:00:00,2150-01-05 12:00:00,{}",
                    quoted(&text)
                )?;
                counts.notes += 1;
            }
        }
    }
    for file in [patients, admissions, diagnoses, procedures, notes] {
        counts.bytes_written += file.finish()?;
    }
    for (name, rows) in [
        ("d_icd_diagnoses", [ICD10_DIAGNOSES, ICD9_DIAGNOSES]),
        ("d_icd_procedures", [ICD10_PROCEDURES, ICD9_PROCEDURES]),
    ] {
        let mut file = GzCsv::create(
            dir.join(format!("hosp/{name}.csv.gz")),
            "icd_code,icd_version,long_title",
        )?;
        for (version, pool) in [(10, rows[0]), (9, rows[1])] {
            for (code, title) in pool {
                writeln!(file.encoder, "{code},{version},{}", quoted(title))?;
            }
        }
        counts.bytes_written += file.finish()?;
    }
    Ok(counts)
}
