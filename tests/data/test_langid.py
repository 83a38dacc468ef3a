"""Language identification: English and Chinese reliably, other scripts and Latin languages roughly."""

from __future__ import annotations

from datagen import en_doc, zh_doc

from tinychat.data.langid import detect_language, script_counts


def test_english_and_chinese(rng):
    for _ in range(20):
        lang, score = detect_language(en_doc(rng))
        assert lang == "en" and score > 0.8
        lang, score = detect_language(zh_doc(rng))
        assert lang == "zh" and score > 0.9


def test_other_languages():
    cases = {
        "fr": "Le chat est sur la table et il ne veut pas descendre, mais nous sommes patients avec lui.",
        "de": "Der Hund ist nicht im Haus, und die Katze schläft auf dem Sofa, weil es kalt ist.",
        "es": "El perro está en la casa y los niños juegan con él porque es muy amable.",
        "nl": "De kat is op de tafel en wil niet naar beneden, maar wij zijn geduldig met hem.",
        "ja": "今日は良い天気ですね。私は公園に行きます。",
        "ko": "오늘은 날씨가 좋습니다. 공원에 갑니다.",
        "cyrl": "Привет, как дела? Это простой тест.",
    }
    for want, text in cases.items():
        assert detect_language(text)[0] == want, text


def test_undetermined():
    assert detect_language("1234 5678 !!! ???") == ("und", 0.0)
    assert detect_language("qwx zzkv bbrt plmq")[0] == "und"
    assert detect_language("") == ("und", 0.0)


def test_mixed_text_follows_the_dominant_script():
    text = "我们在 Python 里写代码，这是一个很长的中文句子，只有一个英文单词。"
    assert detect_language(text)[0] == "zh"
    assert script_counts("abc中文")["hani"] == 2
