//! A prediction as FHIR R4: a `collection` Bundle of a `Condition` per assigned diagnosis
//! (ICD-10-CM) and a `Procedure` per assigned procedure (ICD-10-PCS). The assertion read
//! around the evidence becomes the Condition's verification status; the quoted evidence its
//! `evidence.detail`. The patient is not known to medcoder: `subject` names the note.

use serde_json::{json, Value};

use crate::assertion::Assertion;
use crate::prediction::{CodedItem, NotePrediction};

pub const ICD10_CM_SYSTEM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
pub const ICD10_PCS_SYSTEM: &str = "http://www.cms.gov/Medicare/Coding/ICD10";
const VERIFICATION_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";

/// The assigned codes of a prediction as a FHIR R4 Bundle (JSON).
pub fn to_fhir_bundle(prediction: &NotePrediction) -> Value {
    let subject = json!({"display": format!("the patient of note {}", prediction.id)});
    let conditions = assigned(&prediction.diagnoses).map(|(i, c)| condition(i + 1, c, &subject));
    let procedures = assigned(&prediction.procedures).map(|(i, c)| procedure(i + 1, c, &subject));
    let entries: Vec<Value> = conditions
        .chain(procedures)
        .map(|resource| json!({ "resource": resource }))
        .collect();
    json!({
        "resourceType": "Bundle",
        "identifier": {"value": prediction.id},
        "type": "collection",
        "entry": entries,
    })
}

/// The assigned codes of a ranking, numbered from 0.
fn assigned(items: &[CodedItem]) -> impl Iterator<Item = (usize, &CodedItem)> {
    items.iter().filter(|c| c.assigned).enumerate()
}

fn coding(system: &str, item: &CodedItem) -> Value {
    let mut coding = json!({"system": system, "code": item.code});
    if let Some(description) = &item.description {
        coding["display"] = json!(description);
    }
    let mut concept = json!({ "coding": [coding] });
    if let Some(description) = &item.description {
        concept["text"] = json!(description);
    }
    concept
}

fn condition(n: usize, item: &CodedItem, subject: &Value) -> Value {
    let mut resource = json!({
        "resourceType": "Condition",
        "id": format!("condition-{n}"),
        "code": coding(ICD10_CM_SYSTEM, item),
        "subject": subject,
    });
    let status = match item.assertion {
        Some(Assertion::Present) => Some("confirmed"),
        Some(Assertion::Negated) => Some("refuted"),
        Some(Assertion::Uncertain) => Some("provisional"),
        // About a relative, not this patient: no status claimed, and said in a note.
        Some(Assertion::FamilyHistory) => {
            resource["note"] = json!([{"text": "The evidence mentions it as family history."}]);
            None
        }
        None => None,
    };
    if let Some(status) = status {
        resource["verificationStatus"] =
            json!({"coding": [{"system": VERIFICATION_SYSTEM, "code": status}]});
    }
    if !item.evidence.is_empty() {
        let details: Vec<Value> = item
            .evidence
            .iter()
            .map(|e| json!({"display": e.text}))
            .collect();
        resource["evidence"] = json!([{ "detail": details }]);
    }
    resource
}

fn procedure(n: usize, item: &CodedItem, subject: &Value) -> Value {
    let status = match item.assertion {
        Some(Assertion::Negated) => "not-done",
        _ => "completed",
    };
    let mut resource = json!({
        "resourceType": "Procedure",
        "id": format!("procedure-{n}"),
        "status": status,
        "code": coding(ICD10_PCS_SYSTEM, item),
        "subject": subject,
    });
    if !item.evidence.is_empty() {
        let notes: Vec<Value> = item
            .evidence
            .iter()
            .map(|e| json!({"text": format!("Evidence: \"{}\"", e.text)}))
            .collect();
        resource["note"] = json!(notes);
    }
    resource
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prediction::EvidenceSpan;

    fn item(code: &str, assigned: bool, assertion: Option<Assertion>) -> CodedItem {
        CodedItem {
            code: code.into(),
            rank: 1,
            confidence: 0.9,
            assigned,
            description: Some(format!("description of {code}")),
            billable: Some(true),
            evidence: vec![EvidenceSpan {
                start: 0,
                end: 8,
                text: format!("quote {code}"),
            }],
            assertion,
        }
    }

    #[test]
    fn assigned_codes_become_conditions_and_procedures() {
        let prediction = NotePrediction {
            id: "n7".into(),
            diagnoses: vec![
                item("E11.9", true, Some(Assertion::Present)),
                item("I10", true, Some(Assertion::Negated)),
                item("J18.9", true, Some(Assertion::Uncertain)),
                item("C50.9", true, Some(Assertion::FamilyHistory)),
                item("R50.9", false, Some(Assertion::Present)),
            ],
            procedures: vec![item("0SR9019", true, None)],
            warnings: Vec::new(),
            engine: "test".into(),
            model: "test".into(),
            elapsed_ms: 0.0,
            code_sets: None,
        };
        let bundle = to_fhir_bundle(&prediction);
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "collection");
        let resources: Vec<&Value> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
            .collect();
        assert_eq!(resources.len(), 5, "the unassigned R50.9 is left out");
        let e11 = resources[0];
        assert_eq!(e11["resourceType"], "Condition");
        assert_eq!(e11["id"], "condition-1");
        assert_eq!(e11["code"]["coding"][0]["system"], ICD10_CM_SYSTEM);
        assert_eq!(e11["code"]["coding"][0]["code"], "E11.9");
        assert_eq!(e11["code"]["coding"][0]["display"], "description of E11.9");
        assert_eq!(e11["evidence"][0]["detail"][0]["display"], "quote E11.9");
        assert!(e11["subject"]["display"].as_str().unwrap().contains("n7"));
        let status = |r: &Value| r["verificationStatus"]["coding"][0]["code"].clone();
        assert_eq!(status(e11), "confirmed");
        assert_eq!(
            e11["verificationStatus"]["coding"][0]["system"],
            VERIFICATION_SYSTEM
        );
        assert_eq!(status(resources[1]), "refuted");
        assert_eq!(status(resources[2]), "provisional");
        assert!(resources[3].get("verificationStatus").is_none());
        assert!(resources[3]["note"][0]["text"]
            .as_str()
            .unwrap()
            .contains("family history"));
        let hip = resources[4];
        assert_eq!(hip["resourceType"], "Procedure");
        assert_eq!(hip["status"], "completed");
        assert_eq!(hip["code"]["coding"][0]["system"], ICD10_PCS_SYSTEM);
        assert_eq!(hip["code"]["coding"][0]["code"], "0SR9019");
    }
}
