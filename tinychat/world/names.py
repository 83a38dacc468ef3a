"""Invented names with one fixed Chinese transliteration each.

Why syllables: a name is a few syllables from a fixed inventory, and each syllable has exactly one Chinese
character, so "Talven" is always "泰汶" and a model can learn the correspondence instead of a random pairing.
Why a registry: every name *part* (a given name, a family name, a city, a company stem, a country) is used
by exactly one entity, and no Chinese part is a substring of another. That makes the leak tests exact
(an English part is matched as a whole word, a Chinese name as a substring) and means a name never
points at two entities. The deny lists keep out strings that are real words, names or places; they are
best effort, checked against the syllable inventory, not a guarantee over all languages.
"""

from __future__ import annotations

import random

# (English syllable, Chinese character). Characters are distinct, and none occurs in any template, vocabulary or
# prose string (a test checks), so a Chinese name can only ever match where that name was written.
SYLLABLES: tuple[tuple[str, str], ...] = (
    ("bel", "贝"),
    ("bor", "柏"),
    ("cor", "柯"),
    ("dal", "达"),
    ("dor", "朵"),
    ("dun", "敦"),
    ("fal", "珐"),
    ("fen", "芬"),
    ("fir", "斐"),
    ("gal", "嘉"),
    ("gor", "戈"),
    ("hal", "哈"),
    ("hol", "霍"),
    ("jun", "琼"),
    ("kel", "凯"),
    ("kes", "珂"),
    ("kip", "吉"),
    ("kor", "寇"),
    ("len", "伦"),
    ("lis", "莉"),
    ("lom", "罗"),
    ("lun", "隆"),
    ("mar", "玛"),
    ("mek", "麦"),
    ("mel", "梅"),
    ("mir", "米"),
    ("mor", "莫"),
    ("mun", "蒙"),
    ("nar", "娜"),
    ("nev", "涅"),
    ("nim", "尼"),
    ("nor", "诺"),
    ("nys", "妮"),
    ("pel", "佩"),
    ("pom", "庞"),
    ("quor", "奎"),
    ("ran", "冉"),
    ("ren", "仁"),
    ("rin", "霖"),
    ("rus", "鲁"),
    ("ryn", "琳"),
    ("sel", "塞"),
    ("sim", "锡"),
    ("sor", "莎"),
    ("tal", "泰"),
    ("tam", "坦"),
    ("tis", "蒂"),
    ("tor", "托"),
    ("tun", "屯"),
    ("vas", "瓦"),
    ("vek", "韦"),
    ("vel", "维"),
    ("ven", "汶"),
    ("vor", "沃"),
    ("wen", "雯"),
    ("wyn", "芸"),
    ("xan", "桑"),
    ("yar", "雅"),
    ("yos", "约"),
    ("zan", "赞"),
    ("zel", "泽"),
    ("zir", "齐"),
    ("zun", "尊"),
    ("thar", "瑟"),
    ("hesk", "赫"),
    ("drav", "德"),
    ("brel", "布"),
    ("skov", "斯"),
    ("ar", "阿"),
    ("ol", "奥"),
    ("ul", "乌"),
    ("eth", "艾"),
    ("isk", "伊"),
    ("ost", "欧"),
    ("ur", "厄"),
)
# Vowel-initial syllables only start a name ("Arven"), so no name has a vowel cluster in the middle.
_VOWEL_INITIAL = {s for s, _ in SYLLABLES if s[0] in "aeiou"}

# Real words, given names and places that the inventory can spell (lower-case English, Chinese).
DENY_EN: frozenset[str] = frozenset(
    [
        "marvel",
        "tamar",
        "morsel",
        "mirren",
        "hollis",
        "tallis",
        "marlen",
        "hallen",
        "kelsen",
        "torres",
        "dorset",
        "selma",
        "mortal",
        "corfu",
        "malta",
        "dunmore",
        "belfast",
        "kipling",
        "kesmar",
        "lismore",
        "morris",
        "mordor",
        "gorgon",
        "dalmar",
        "palermo",
        "norway",
        "holland",
        "oman",
        "omar",
        "ulster",
        "arlen",
        "arran",
        "arrow",
        "urban",
        "olsen",
        "oslo",
    ]
)
DENY_ZH: frozenset[str] = frozenset(
    [
        "罗马",
        "米兰",
        "伦敦",
        "莫斯科",
        "芬兰",
        "伊朗",
        "加纳",
        "图瓦",
        "索菲亚",
        "多伦多",
        "凯文",
        "西蒙",
        "琳达",
        "贝蒂",
        "马克",
        "索菲",
        "梅林",
        "玛莉",
        "莉莉",
        "玛雅",
        "约瑟",
        "约翰",
        "达林",
        "哈林",
        "柯林",
        "霍林",
        "凯莉",
        "雅典",
        "维也纳",
        "德国",
        "法国",
        "阿伦",
        "奥林",
        "林肯",
        "阿曼",
        "加蓬",
        "贝宁",
        "索马里",
        "莫尼卡",
        "尼娜",
        "娜塔",
        "文莉",
        "诺贝",
        "斯坦",
        "斯里",
        "伊斯",
        "瓦伦",
        "瑟琳",
        "塔林",
        "加达",
        "莫娜",
        "佩林",
        "博伦",
        "泽林",
        "米雅",
        "罗林",
        "托林",
        "伊林",
        "欧文",
        "奥托",
        "阿达",
    ]
)


class NameRegistry:
    """Hands out unique invented name parts; see the module docstring for the guarantees."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.en: set[str] = set()  # lower-case parts in use
        self.zh: set[str] = set()  # Chinese parts in use
        self.zh_subs: set[str] = set()  # every substring (len >= 2) of a Chinese part in use

    def _ok(self, en: str, zh: str) -> bool:
        low = en.lower()
        if low in self.en or low in DENY_EN or zh in self.zh_subs:
            return False
        subs = {zh[i:j] for i in range(len(zh)) for j in range(i + 2, len(zh) + 1)}
        return not (subs & self.zh or subs & DENY_ZH)

    def _claim(self, en: str, zh: str) -> None:
        self.en.add(en.lower())
        self.zh.add(zh)
        self.zh_subs.update(zh[i:j] for i in range(len(zh)) for j in range(i + 2, len(zh) + 1))

    def part(self, n_syllables: int, suffix: tuple[str, str] = ("", "")) -> tuple[str, str]:
        """A fresh (English, Chinese) name part of n syllables, with an optional suffix such as ("ia", "亚")."""
        for attempt in range(2_000):
            n = n_syllables + attempt // 500  # a crowded length spills over to a longer one
            sylls: list[tuple[str, str]] = []
            while len(sylls) < n:
                s = self.rng.choice(SYLLABLES)
                if sylls and (s[0] in _VOWEL_INITIAL or s in sylls):
                    continue
                sylls.append(s)
            en = "".join(s for s, _ in sylls) + suffix[0]
            zh = "".join(c for _, c in sylls) + suffix[1]
            en = en[0].upper() + en[1:]
            if self._ok(en, zh):
                self._claim(en, zh)
                return en, zh
        raise RuntimeError("name inventory exhausted (a bug in the size presets)")

    def person(self) -> tuple[str, str]:
        """Given name + family name; Chinese joins the two with the middle dot used for foreign names."""
        g_en, g_zh = self.part(self.rng.choice((2, 2, 3)))
        f_en, f_zh = self.part(self.rng.choice((2, 2, 3)))
        return f"{g_en} {f_en}", f"{g_zh}·{f_zh}"

    def place(self) -> tuple[str, str]:
        return self.part(self.rng.choice((2, 3, 3)))

    def country(self) -> tuple[str, str]:
        return self.part(2, ("ia", "亚"))
