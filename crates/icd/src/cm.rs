//! ICD-10-CM: the CMS/NCHS tabular list (XML) parsed into chapters, blocks and codes, with
//! 7th-character codes expanded as the official code list has them.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::notes::{code_references, CodeRange, Note, NoteKind};
use crate::IcdError;

/// Where an entry sits in the classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CmKind {
    Chapter,
    /// A section of the tabular list, e.g. `E08-E13`.
    Block,
    /// A 3-character code, e.g. `E11`.
    Category,
    Subcategory,
    /// A code built by adding a 7th character, e.g. `S72.001A`.
    Extended,
}

impl CmKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Chapter => "chapter",
            Self::Block => "block",
            Self::Category => "category",
            Self::Subcategory => "subcategory",
            Self::Extended => "code with 7th character",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CmEntry {
    /// Display form: `E11.9`, `S72.001A`; a block `E08-E13`; a chapter `4`.
    pub code: String,
    pub kind: CmKind,
    pub description: String,
    /// A leaf of the tabular list: a code that may be reported.
    pub billable: bool,
    pub parent: Option<u32>,
    pub children: Vec<u32>,
    pub notes: Vec<Note>,
    /// 7th characters defined at this entry, for the codes below it.
    pub seventh_characters: Vec<(char, String)>,
    /// Codes named by this entry's own Excludes1 notes.
    pub excludes1: Vec<CodeRange>,
}

/// The ICD-10-CM code set of one release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CmCodeSet {
    /// e.g. `ICD-10-CM FY2026 (April 1, 2026 update)`.
    pub version: String,
    pub entries: Vec<CmEntry>,
    /// Compact code (no dot) → entry, for categories and below.
    codes: HashMap<String, u32>,
    /// Block id (`E08-E13`) → entry.
    blocks: HashMap<String, u32>,
    pub chapters: Vec<u32>,
}

impl CmCodeSet {
    pub fn get(&self, compact: &str) -> Option<&CmEntry> {
        self.index_of(compact).map(|i| &self.entries[i as usize])
    }

    pub fn index_of(&self, compact: &str) -> Option<u32> {
        self.codes.get(compact).copied()
    }

    pub fn block(&self, id: &str) -> Option<u32> {
        self.blocks.get(id).copied()
    }

    pub fn entry(&self, index: u32) -> &CmEntry {
        &self.entries[index as usize]
    }

    /// Ancestors from the parent up to the chapter.
    pub fn ancestors(&self, index: u32) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors(self.entries[index as usize].parent, move |i| {
            self.entries[*i as usize].parent
        })
    }

    /// Codes (categories and below), not chapters or blocks.
    pub fn code_count(&self) -> usize {
        self.codes.len()
    }

    pub fn billable_count(&self) -> usize {
        self.entries.iter().filter(|e| e.billable).count()
    }

    pub fn count_of(&self, kind: CmKind) -> usize {
        self.entries.iter().filter(|e| e.kind == kind).count()
    }

    /// The 7th characters in force for an entry: the nearest definition at it or above it.
    pub fn seventh_characters_for(&self, index: u32) -> &[(char, String)] {
        std::iter::once(index)
            .chain(self.ancestors(index))
            .map(|i| &self.entries[i as usize].seventh_characters)
            .find(|defs| !defs.is_empty())
            .map_or(&[], Vec::as_slice)
    }
}

/// Parse the tabular XML; `code_list` (one compact code per line, as CMS/NCHS publish it) tells
/// which 7th-character codes exist, since some 7th characters are not valid for every code.
pub fn parse_tabular(
    xml_path: &Path,
    code_list_path: Option<&Path>,
) -> Result<CmCodeSet, IcdError> {
    let text = fs_err::read_to_string(xml_path)?;
    let doc = roxmltree::Document::parse(&text).map_err(|e| IcdError::Xml {
        path: xml_path.to_path_buf(),
        message: e.to_string(),
    })?;
    let listed: Option<HashSet<String>> = match code_list_path {
        Some(path) => Some(
            fs_err::read_to_string(path)?
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => None,
    };
    let root = doc.root_element();
    let release_year = child_text(root, "version").unwrap_or_default();
    let mut builder = Builder {
        set: CmCodeSet {
            version: version_label(&release_year),
            entries: Vec::new(),
            codes: HashMap::new(),
            blocks: HashMap::new(),
            chapters: Vec::new(),
        },
        listed,
    };
    for chapter in root.children().filter(|n| n.has_tag_name("chapter")) {
        let index = builder.push(
            child_text(chapter, "name").unwrap_or_default(),
            CmKind::Chapter,
            chapter,
            None,
        );
        builder.set.chapters.push(index);
        for section in chapter.children().filter(|n| n.has_tag_name("section")) {
            let id = section.attribute("id").unwrap_or_default().to_string();
            let block = builder.push(id.clone(), CmKind::Block, section, Some(index));
            builder.set.blocks.insert(id, block);
            for diag in section.children().filter(|n| n.has_tag_name("diag")) {
                builder.push_diag(diag, block, None)?;
            }
        }
    }
    Ok(builder.set)
}

fn version_label(release_year: &str) -> String {
    if release_year.is_empty() {
        "ICD-10-CM".to_string()
    } else {
        format!("ICD-10-CM FY{release_year}")
    }
}

fn child_text(node: roxmltree::Node, tag: &str) -> Option<String> {
    node.children()
        .find(|n| n.has_tag_name(tag))
        .map(|n| normalize_space(n.text().unwrap_or_default()))
}

fn normalize_space(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Builder {
    set: CmCodeSet,
    listed: Option<HashSet<String>>,
}

impl Builder {
    fn push(
        &mut self,
        code: String,
        kind: CmKind,
        node: roxmltree::Node,
        parent: Option<u32>,
    ) -> u32 {
        let mut notes = Vec::new();
        let mut seventh_characters = Vec::new();
        for child in node.children().filter(roxmltree::Node::is_element) {
            let tag = child.tag_name().name();
            if let Some(kind) = NoteKind::from_tag(tag) {
                for note in child.children().filter(|n| n.has_tag_name("note")) {
                    let text = normalize_space(note.text().unwrap_or_default());
                    if !text.is_empty() {
                        notes.push(Note { kind, text });
                    }
                }
            } else if tag == "sevenChrDef" {
                for ext in child.children().filter(|n| n.has_tag_name("extension")) {
                    if let Some(c) = ext.attribute("char").and_then(|c| c.chars().next()) {
                        seventh_characters
                            .push((c, normalize_space(ext.text().unwrap_or_default())));
                    }
                }
            }
        }
        let excludes1 = notes
            .iter()
            .filter(|n| n.kind == NoteKind::Excludes1)
            .flat_map(|n| code_references(&n.text))
            .collect();
        let description = child_text(node, "desc").unwrap_or_default();
        self.push_entry(CmEntry {
            code,
            kind,
            description,
            billable: false,
            parent,
            children: Vec::new(),
            notes,
            seventh_characters,
            excludes1,
        })
    }

    fn push_entry(&mut self, entry: CmEntry) -> u32 {
        let index = u32::try_from(self.set.entries.len()).unwrap_or(u32::MAX);
        if let Some(parent) = entry.parent {
            self.set.entries[parent as usize].children.push(index);
        }
        if matches!(
            entry.kind,
            CmKind::Category | CmKind::Subcategory | CmKind::Extended
        ) {
            self.set.codes.insert(entry.code.replace('.', ""), index);
        }
        self.set.entries.push(entry);
        index
    }

    /// A `<diag>` and everything below it; `seventh` is the nearest 7th-character definition above.
    fn push_diag(
        &mut self,
        node: roxmltree::Node,
        parent: u32,
        seventh: Option<u32>,
    ) -> Result<(), IcdError> {
        let name = child_text(node, "name").unwrap_or_default();
        let kind = if name.len() == 3 {
            CmKind::Category
        } else {
            CmKind::Subcategory
        };
        let index = self.push(name, kind, node, Some(parent));
        let seventh = if self.set.entries[index as usize]
            .seventh_characters
            .is_empty()
        {
            seventh
        } else {
            Some(index)
        };
        let children: Vec<_> = node.children().filter(|n| n.has_tag_name("diag")).collect();
        for child in &children {
            self.push_diag(*child, index, seventh)?;
        }
        if !children.is_empty() {
            return Ok(());
        }
        match seventh {
            Some(def) => self.expand_seventh(index, def),
            None => self.set.entries[index as usize].billable = true,
        }
        Ok(())
    }

    /// Add the 7th-character codes of a leaf: pad with the placeholder X to six characters.
    fn expand_seventh(&mut self, leaf: u32, def: u32) {
        let base = self.set.entries[leaf as usize].code.replace('.', "");
        let mut padded = base.clone();
        while padded.len() < 6 {
            padded.push('X');
        }
        let description = self.set.entries[leaf as usize].description.clone();
        let defs = self.set.entries[def as usize].seventh_characters.clone();
        let mut added = 0;
        for (c, meaning) in defs {
            let compact = format!("{padded}{c}");
            if self.listed.as_ref().is_some_and(|l| !l.contains(&compact)) {
                continue;
            }
            added += 1;
            self.push_entry(CmEntry {
                code: crate::code::dotted(&compact),
                kind: CmKind::Extended,
                description: format!("{description}, {meaning}"),
                billable: true,
                parent: Some(leaf),
                children: Vec::new(),
                notes: Vec::new(),
                seventh_characters: Vec::new(),
                excludes1: Vec::new(),
            });
        }
        // A leaf whose every 7th character is ruled out by the code list stays reportable as is.
        if added == 0 {
            self.set.entries[leaf as usize].billable = true;
        }
    }
}
