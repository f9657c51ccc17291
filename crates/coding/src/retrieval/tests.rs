use super::*;

fn note(id: &str, text: &str, dx: &[&str]) -> LabelledNote {
    LabelledNote {
        id: id.into(),
        text: text.into(),
        diagnoses: dx.iter().map(|s| s.to_string()).collect(),
        procedures: Vec::new(),
        mentions: Vec::new(),
    }
}

#[test]
fn similar_notes_lend_their_codes_and_evidence_points_into_the_note() {
    let mut notes = Vec::new();
    for i in 0..6 {
        notes.push(note(
            &format!("d{i}"),
            &format!("Type 2 diabetes mellitus with poor glycemic control, visit {i}."),
            &["E11.9"],
        ));
        notes.push(note(
            &format!("p{i}"),
            &format!("Community acquired pneumonia of the right lower lobe, case {i}."),
            &["J18.9"],
        ));
    }
    let index = RetrievalIndex::fit(&notes, "test".into(), FitAids::default()).unwrap();
    assert!(
        index.calibration.loo_map[0] > 0.99,
        "{:?}",
        index.calibration
    );
    let text = "Known diabetes mellitus type 2. Glycemic control was poor.";
    let describe = |code: &str, _: CodeKind| {
        (code == "E11.9").then(|| {
            (
                "Type 2 diabetes mellitus without complications".into(),
                true,
            )
        })
    };
    let p = index.predict("x", text, &describe, None, None).unwrap();
    assert_eq!(p.diagnoses[0].code, "E11.9");
    assert!(p.diagnoses[0].assigned);
    let ev = &p.diagnoses[0].evidence[0];
    let quoted: String = text
        .chars()
        .skip(ev.start)
        .take(ev.end - ev.start)
        .collect();
    assert_eq!(quoted, ev.text);
    assert!(ev.text.contains("diabetes"));
    assert!(!p.diagnoses.iter().skip(1).any(|c| c.assigned));
    let back = RetrievalIndex::from_json(&index.to_json().unwrap()).unwrap();
    assert_eq!(
        back.predict("x", text, &describe, None, None)
            .unwrap()
            .diagnoses,
        p.diagnoses
    );
}

/// Notes about one of three conditions, each with one of four unrelated codes, and two of
/// every eight also mentioning an enlarged testicle (N44.8, annotated on that sentence): the
/// whole-note neighbours cannot tell which notes have it.
fn notes_with_a_side_finding(with_mentions: bool) -> Vec<LabelledNote> {
    const FINDING: &str = "Urological examination revealed an enlarged right testicle.";
    let topics = [
        (
            "I50.9",
            "Congestive heart failure with reduced ejection fraction and leg edema",
        ),
        (
            "J18.9",
            "Community acquired pneumonia of the right lower lobe with fever",
        ),
        (
            "E11.9",
            "Type 2 diabetes mellitus with poor glycemic control and thirst",
        ),
    ];
    let others = ["R50.9", "R51", "R52", "R53.83"];
    let mut notes = Vec::new();
    for (code, topic) in topics {
        for i in 0..8 {
            let mut text = format!("{topic}, case {i}. Treated and discharged home.");
            let mut codes = vec![code, others[i % 4]];
            let mut mentions = Vec::new();
            if i % 4 == 1 {
                text.push('\n');
                let start = text.chars().count();
                text.push_str(FINDING);
                codes.push("N44.8");
                mentions.push(GoldMention {
                    kind: CodeKind::Diagnosis,
                    code: "N44.8".into(),
                    start,
                    end: start + FINDING.chars().count(),
                });
            }
            let mut n = note(&format!("{code}-{i}"), &text, &codes);
            if with_mentions {
                n.mentions = mentions;
            }
            notes.push(n);
        }
    }
    notes
}

#[test]
fn an_annotated_mention_is_found_in_a_note_about_something_else() {
    let text = "Type 2 diabetes mellitus with poor glycemic control and thirst, case 9. \
                Treated and discharged home.\nOn examination, an enlarged right testicle.";
    let describe = |code: &str, _: CodeKind| {
        (code == "N44.8").then(|| {
            (
                "Other specified disorders of male genital organs".into(),
                true,
            )
        })
    };
    let rank_of_n44 = |with_mentions: bool| {
        let notes = notes_with_a_side_finding(with_mentions);
        let index = RetrievalIndex::fit(&notes, "test".into(), FitAids::default()).unwrap();
        assert_eq!(index.mentions.is_empty(), !with_mentions);
        let p = index.predict("x", text, &describe, None, None).unwrap();
        let item = p.diagnoses.iter().find(|c| c.code == "N44.8").cloned();
        (item, p.diagnoses[0].code.clone())
    };
    let (with, top) = rank_of_n44(true);
    let with = with.expect("N44.8 ranked with mentions");
    assert!(with.rank <= 2, "{with:?}");
    assert_eq!(top, if with.rank == 1 { "N44.8" } else { "E11.9" });
    let (without, _) = rank_of_n44(false);
    assert!(
        without
            .as_ref()
            .is_none_or(|w| w.rank > with.rank && w.confidence < with.confidence),
        "without mentions: {without:?}, with: {with:?}"
    );
    if with.assigned {
        // The description shares no word with the note: the matched sentence is the evidence.
        assert_eq!(
            with.evidence[0].text,
            "On examination, an enlarged right testicle."
        );
    }
}
