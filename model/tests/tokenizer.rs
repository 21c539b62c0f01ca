//! The CLIP tokenizer (the real 49,408-token BPE vocabulary) against transformers' `CLIPTokenizer` and OpenAI's
//! original `SimpleTokenizer` (from open-clip-torch): the 8 class prompts and 23 other sentences
//! (punctuation, numbers, unicode, emoji, over-long text, empty text).

use avexpr_data::Expression;
use avexpr_model::clip::ClipTokenizer;
use avexpr_model::fixtures::clip_tokenizer_dir;

#[derive(serde::Deserialize)]
struct Row {
    text: String,
    hf: Vec<u32>,
    openai: Vec<u32>,
}

fn rows() -> (ClipTokenizer, Vec<Row>) {
    let dir = clip_tokenizer_dir().expect("tokenizer fixture");
    let rows: Vec<Row> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_ids.json")).unwrap()).unwrap();
    (ClipTokenizer::from_dir(&dir, 77).unwrap(), rows)
}

#[test]
fn token_ids_equal_transformers_clip_tokenizer() {
    let (tok, rows) = rows();
    assert!(rows.len() >= 28);
    for row in &rows {
        assert_eq!(tok.encode_ids(&row.text).unwrap(), row.hf, "text {:?}", row.text);
    }
}

#[test]
fn token_ids_equal_openai_tokenizer_except_literal_special_tokens() {
    let (tok, rows) = rows();
    let mut compared = 0;
    for row in rows.iter().filter(|r| !r.text.contains("<|")) {
        assert_eq!(tok.encode_ids(&row.text).unwrap(), row.openai, "text {:?}", row.text);
        compared += 1;
    }
    assert!(compared >= 28);
}

#[test]
fn class_prompts_pad_and_truncate_to_77() {
    let (tok, _) = rows();
    let prompts: Vec<String> =
        Expression::ALL.iter().map(|e| format!("A face expressing {}", e.name().to_lowercase())).collect();
    let batch = tok.encode_batch(&prompts.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert_eq!(batch.input_ids.size(), [8, 77]);
    let ids = Vec::<i64>::try_from(batch.input_ids.get(4)).unwrap();
    // <|startoftext|> a face expressing happiness <|endoftext|>, then padding with <|endoftext|>.
    assert_eq!(&ids[..6], &[49406, 320, 1710, 30207, 5096, 49407]);
    assert!(ids[6..].iter().all(|&i| i == 49407));
    assert_eq!(batch.attention_mask.get(4).sum(tch::Kind::Int64).int64_value(&[]), 6);
    let long = tok.encode_ids(&"word ".repeat(200)).unwrap();
    assert_eq!(long.len(), 77);
    assert_eq!((long[0], long[76]), (49406, 49407));
}
