"""General prose about nothing in particular, in both languages.

Why: a model trained only on fact sentences learns fact sentences; a share of ordinary prose keeps its
language general and makes the pretraining mix look like a (very small) web corpus. Filler never names
an entity and never states a fact, so it cannot leak or contradict the world.
"""

from __future__ import annotations

import random

from tinychat.world.facts import Lang

_EN_SUBJ = (
    "The old farmer",
    "A young student",
    "My neighbour",
    "The teacher",
    "A tired traveller",
    "The children",
    "Our family",
    "The shopkeeper",
    "A quiet boy",
    "The girl next door",
    "Everyone in the village",
    "The fisherman",
    "My grandmother",
    "A group of friends",
    "The new doctor",
    "The cook",
)
_EN_PRED = (
    "walked slowly along the river",
    "made a pot of strong tea",
    "read a long book about the sea",
    "planted tomatoes in the garden",
    "waited for the bus in the rain",
    "cleaned the kitchen",
    "wrote a letter to an old friend",
    "painted the fence blue",
    "baked bread for the neighbours",
    "fixed the broken window",
    "listened to the radio",
    "counted the coins on the table",
    "climbed the hill behind the house",
    "fed the ducks at the pond",
    "sang a song about the harvest",
    "carried water from the well",
    "folded the clean laundry",
    "looked at the stars for a long time",
    "sold apples at the market",
    "repaired an old bicycle",
)
_EN_ADV = (
    "in the morning",
    "after lunch",
    "on a cold evening",
    "before sunrise",
    "every Sunday",
    "last summer",
    "during the holidays",
    "when the snow melted",
    "on a windy afternoon",
    "late at night",
    "as usual",
    "without saying a word",
)
_EN_EXTRA = (
    "The weather was mild and the sky was clear.",
    "It was a quiet day, and nothing much happened.",
    "Later, everyone sat down to eat together.",
    "The streets were empty and wet.",
    "Birds were singing in the trees.",
    "Nobody was in a hurry.",
    "The bell rang twice in the distance.",
    "It started to rain a little.",
    "Soon the sun went down behind the hills.",
    "The air smelled of fresh bread and wood smoke.",
)

_ZH_SUBJ = (
    "老农夫",
    "一个年轻的学生",
    "我的邻居",
    "老师",
    "一位疲惫的旅行者",
    "孩子们",
    "我们一家人",
    "店主",
    "一个安静的男孩",
    "隔壁的女孩",
    "全村的人",
    "渔夫",
    "我的奶奶",
    "一群朋友",
    "新来的医生",
    "厨师",
)
_ZH_PRED = (
    "沿着河边慢慢地散步",
    "泡了一壶浓茶",
    "读了一本关于大海的长篇小说",
    "在菜园里种了番茄",
    "在雨中等公交车",
    "把厨房打扫干净",
    "给老朋友写了一封信",
    "把篱笆刷成了蓝色",
    "给邻居们烤了面包",
    "修好了破窗户",
    "听了一会儿广播",
    "数了数桌上的硬币",
    "爬上了屋后的小山",
    "在池塘边喂鸭子",
    "唱了一首丰收的歌",
    "从井里打水",
    "叠好了洗干净的衣服",
    "看了很久的星星",
    "在集市上卖苹果",
    "修好了一辆旧自行车",
)
_ZH_ADV = (
    "早上",
    "午饭以后",
    "在一个寒冷的傍晚",
    "天亮之前",
    "每个星期天",
    "去年夏天",
    "放假的时候",
    "雪化了以后",
    "在一个刮风的下午",
    "深夜",
    "像往常一样",
    "一句话也没说就",
)
_ZH_EXTRA = (
    "天气很温和，天空很晴朗。",
    "那是平静的一天，没有发生什么特别的事。",
    "后来，大家坐在一起吃饭。",
    "街道空荡荡的，地面还是湿的。",
    "鸟儿在树上歌唱。",
    "谁也不着急。",
    "远处的钟声响了两下。",
    "天开始下起了小雨。",
    "太阳很快就落到了山后。",
    "空气中弥漫着新鲜面包和柴火的味道。",
)


def sentence(lang: Lang, rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_EN_EXTRA if lang == "en" else _ZH_EXTRA)
    if lang == "en":
        adv = rng.choice(_EN_ADV)
        return f"{rng.choice(_EN_SUBJ)} {rng.choice(_EN_PRED)} {adv}."
    return f"{rng.choice(_ZH_SUBJ)}{rng.choice(_ZH_ADV)}{rng.choice(_ZH_PRED)}。"


def paragraph(lang: Lang, rng: random.Random, n_min: int = 4, n_max: int = 8) -> str:
    sents = [sentence(lang, rng) for _ in range(rng.randint(n_min, n_max))]
    return (" " if lang == "en" else "").join(sents)
