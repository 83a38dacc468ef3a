"""Chinese (Simplified) wording, parallel to render_en: the same facts, stated and asked in varied ways.

Why parallel and not translated sentence by sentence: the model should learn each fact in both languages
from independent wordings; numbers stay digits and names use their fixed transliteration.
Placeholders: {n} entity name, {v} value, {ta} 他/她.
"""

from __future__ import annotations

STATEMENTS: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{n}出生于{v}年。",
        "{n}生于{v}年。",
        "{n}的出生年份是{v}年。",
        "{v}年，{n}出生了。",
        "{n}是{v}年出生的。",
        "{n}于{v}年出生。",
    ),
    "birth_city": (
        "{n}出生在{v}。",
        "{n}的出生地是{v}。",
        "{n}是在{v}出生的。",
        "{n}的家乡是{v}。",
        "{v}是{n}的出生地。",
        "{n}来自{v}，那是{ta}出生的城市。",
    ),
    "occupation": (
        "{n}是一名{v}。",
        "{n}的职业是{v}。",
        "{n}以{v}为业。",
        "{n}的工作是{v}。",
        "作为一名{v}，{n}工作很认真。",
        "{n}靠做{v}谋生。",
    ),
    "employer": (
        "{n}在{v}工作。",
        "{n}受雇于{v}。",
        "{n}的雇主是{v}。",
        "{v}雇用了{n}。",
        "{n}就职于{v}。",
        "{n}是{v}的员工。",
    ),
    "hobby": (
        "{n}的爱好是{v}。",
        "{n}业余时间喜欢{v}。",
        "{n}最喜欢的消遣是{v}。",
        "{n}热爱{v}。",
        "{n}最大的兴趣是{v}。",
        "空闲的时候，{n}总是喜欢{v}。",
    ),
    "country": (
        "{n}是{v}的一座城市。",
        "{n}位于{v}。",
        "{n}坐落在{v}境内。",
        "{n}属于{v}。",
        "{v}境内有一座城市叫{n}。",
        "{n}是{v}的城市之一。",
    ),
    "population": (
        "{n}的人口为{v}。",
        "{n}有{v}名居民。",
        "{n}的居民人数是{v}。",
        "共有{v}人生活在{n}。",
        "{n}拥有{v}人口。",
        "{n}的常住人口是{v}。",
    ),
    "landmark": (
        "{n}以{v}闻名。",
        "{n}最著名的地标是{v}。",
        "{v}位于{n}。",
        "游客来到{n}都要去看{v}。",
        "{v}是{n}的标志性建筑。",
        "{n}最有名的景点是{v}。",
    ),
    "founder": (
        "{n}由{v}创立。",
        "{v}创办了{n}。",
        "{n}的创始人是{v}。",
        "{n}是{v}创建的。",
        "{v}是{n}的创办者。",
        "{n}最初由{v}一手建立。",
    ),
    "founded": (
        "{n}成立于{v}年。",
        "{n}创立于{v}年。",
        "{n}始建于{v}年。",
        "{v}年，{n}成立了。",
        "{n}的成立年份是{v}年。",
        "{n}自{v}年起开始经营。",
    ),
    "headquarters": (
        "{n}的总部位于{v}。",
        "{n}总部设在{v}。",
        "{n}的总部在{v}。",
        "{n}以{v}为总部所在地。",
        "{v}是{n}总部的所在地。",
        "{n}的主要办公室设在{v}。",
    ),
    "product": (
        "{n}生产{v}。",
        "{n}以{v}闻名。",
        "{n}的主要产品是{v}。",
        "{n}制造{v}。",
        "{n}出产{v}。",
        "{n}卖得最多的是{v}。",
    ),
}

# How the assistant answers a question about a fact (see render_en.ANSWERS). Birth city and employer: a
# pronoun and the cloze statement's relation words, then the value ("她的出生地是朵莫瑟。"), as English replies
# end in a statement's wording. Why: the round-35 models store these facts (cloze 94-95%) and answer them bare
# at 38-39%; given "他/她的出生地是" / "的雇主是" as the reply's first words they answer 17-19 of 21 birth cities
# and 12-14 of 18 employers where bare replies had 8-10 and 1-7 (docs/speedrun.md, round 35). The rest stay
# bare: the same prefix lowered hobby, birth year and occupation (4-10 of 23-31 against 14-20), as a pronoun
# sentence did in round 8 (42% bare against 34%). Round 13's name-first statement made the model copy the name
# and name the wrong relation; a pronoun needs no copy. Whole runs, three seeds: these two facts 70 -> 115 of 132
# right, held-out facts +5.7 to +8.6 points.
ANSWERS: dict[str, str] = {"birth_city": "{ta}的出生地是{v}。", "employer": "{ta}的雇主是{v}。"}

CLOZE = {
    "birth_year": 0,
    "birth_city": 1,
    "occupation": 1,
    "employer": 2,
    "hobby": 0,
    "country": 1,
    "population": 0,
    "landmark": 1,
    "founder": 2,
    "founded": 0,
    "headquarters": 0,
    "product": 2,
}

NARRATIVE: dict[str, tuple[str, ...]] = {
    "birth_year": ("那是{v}年，{n}出生了。", "{n}出生于{v}年，全家人都很高兴。"),
    "birth_city": ("{n}在{v}长大，{v}也是{ta}出生的地方。", "{n}出生在{v}，小时候很喜欢那里热闹的街道。"),
    "occupation": ("经过多年学习，{n}成为了一名{v}。", "如今{n}是一名{v}，而且很喜欢这份工作。"),
    "employer": ("后来{n}加入了{v}，至今仍在那里工作。", "每天早上，{n}都去{v}上班。"),
    "hobby": ("周末的时候，{n}总会去享受{v}的乐趣。", "朋友们都知道，{n}每周都离不开{v}。"),
    "country": ("旅行者很快就会知道，{n}位于{v}。", "{n}逐渐发展成为{v}最繁忙的城市之一。"),
    "population": ("{n}的街道十分热闹，那里生活着{v}人。", "如今有{v}人把{n}当作自己的家。"),
    "landmark": ("来{n}而不去看{v}，就不算真正来过。", "每到傍晚，{v}都在{n}的屋顶之上闪闪发光。"),
    "founder": ("最初想到创办{n}的人是{v}。", "{v}和几个朋友一起创办了{n}。"),
    "founded": ("{n}的第一个工坊开张于{v}年。", "{n}的故事始于{v}年，那一年它成立了。"),
    "headquarters": ("{n}在{v}的总部管理着全部业务。", "{n}的总部就在{v}的市中心。"),
    "product": ("顾客们都喜欢买{n}生产的{v}。", "多年来，{n}因生产{v}而出名。"),
}

INTROS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "person": (
        ("{n}（{birth_year}年出生）是一名来自{birth_city}的{occupation}。", ("birth_year", "birth_city", "occupation")),
        ("{n}是一名{occupation}，出生于{birth_year}年。", ("occupation", "birth_year")),
        ("{n}是{employer}的一名{occupation}。", ("employer", "occupation")),
    ),
    "city": (
        ("{n}是{country}的一座城市，人口为{population}。", ("country", "population")),
        ("{n}是{country}的一座城市，以{landmark}闻名。", ("country", "landmark")),
    ),
    "company": (
        ("{n}是一家由{founder}于{founded}年创立的公司。", ("founder", "founded")),
        ("{n}是一家总部位于{headquarters}、生产{product}的公司。", ("headquarters", "product")),
    ),
}
NARRATIVE_OPEN = {
    "person": "这是关于{n}的故事。",
    "city": "下面简单介绍一下{n}这座城市。",
    "company": "这是{n}这家公司的历史。",
}
COUNTRY_DOC = ("{c}是一个国家。{c}的城市包括{cities}。", "{c}境内的城市有{cities}。")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{n}是哪一年出生的？",
        "{n}出生于哪一年？",
        "{n}的出生年份是哪一年？",
        "{n}生于哪年？",
        "请问{n}是哪年出生的？",
    ),
    "birth_city": (
        "{n}出生在哪里？",
        "{n}出生在哪座城市？",
        "{n}的出生地是哪里？",
        "{n}的家乡是哪座城市？",
        "{n}是在哪个城市出生的？",
    ),
    "occupation": (
        "{n}是做什么工作的？",
        "{n}的职业是什么？",
        "{n}从事什么职业？",
        "{n}以什么为业？",
        "请问{n}的工作是什么？",
    ),
    "employer": (
        "{n}在哪家公司工作？",
        "{n}的雇主是谁？",
        "哪家公司雇用了{n}？",
        "{n}就职于哪家公司？",
        "{n}为哪家公司工作？",
    ),
    "hobby": (
        "{n}的爱好是什么？",
        "{n}业余时间喜欢做什么？",
        "{n}有什么爱好？",
        "{n}最喜欢的消遣是什么？",
        "{n}平时热爱什么活动？",
    ),
    "country": (
        "{n}位于哪个国家？",
        "{n}属于哪个国家？",
        "{n}是哪个国家的城市？",
        "{n}在哪个国家？",
        "请问{n}坐落在哪个国家？",
    ),
    "population": (
        "{n}的人口是多少？",
        "{n}有多少居民？",
        "有多少人生活在{n}？",
        "{n}的居民人数是多少？",
        "请问{n}有多少人口？",
    ),
    "landmark": (
        "{n}以什么闻名？",
        "{n}最著名的地标是什么？",
        "{n}的标志性建筑是什么？",
        "去{n}的游客一定要看什么？",
        "{n}有什么著名景点？",
    ),
    "founder": ("{n}是谁创立的？", "{n}的创始人是谁？", "谁创办了{n}？", "{n}由谁创建？", "请问{n}的创办者是谁？"),
    "founded": (
        "{n}是哪一年成立的？",
        "{n}成立于哪一年？",
        "{n}的成立年份是哪一年？",
        "{n}创立于哪年？",
        "请问{n}是哪年创建的？",
    ),
    "headquarters": (
        "{n}的总部在哪里？",
        "{n}的总部位于哪座城市？",
        "{n}总部设在哪里？",
        "{n}的总部所在地是哪里？",
        "请问{n}的总部在哪个城市？",
    ),
    "product": (
        "{n}生产什么？",
        "{n}的主要产品是什么？",
        "{n}制造什么产品？",
        "{n}以什么产品闻名？",
        "请问{n}出产什么？",
    ),
}

FOLLOWUPS: dict[str, tuple[str, ...]] = {
    "birth_year": ("那{ta}是哪一年出生的？", "{ta}出生于哪一年？"),
    "birth_city": ("{ta}出生在哪里？", "那{ta}的家乡是哪座城市？"),
    "occupation": ("{ta}是做什么工作的？", "那{ta}的职业是什么？"),
    "employer": ("{ta}在哪家公司工作？", "那{ta}的雇主是谁？"),
    "hobby": ("{ta}的爱好是什么？", "那{ta}平时喜欢做什么？"),
    "country": ("它位于哪个国家？", "那它属于哪个国家？"),
    "population": ("它的人口是多少？", "那里生活着多少人？"),
    "landmark": ("它以什么闻名？", "那它最著名的地标是什么？"),
    "founder": ("它是谁创立的？", "那它的创始人是谁？"),
    "founded": ("它是哪一年成立的？", "那它成立于哪一年？"),
    "headquarters": ("它的总部在哪里？", "那它的总部设在哪里？"),
    "product": ("它生产什么？", "那它的主要产品是什么？"),
}
HOPS: dict[str, tuple[tuple[str, str], ...]] = {
    "birth_city": (("country", "那座城市在哪个国家？"), ("landmark", "那座城市以什么闻名？")),
    "employer": (("founder", "那家公司是谁创立的？"), ("product", "那家公司生产什么？")),
    "headquarters": (("population", "那座城市有多少人口？"), ("country", "那座城市在哪个国家？")),
    "founder": (("birth_year", "那个人是哪一年出生的？"), ("hobby", "那个人的爱好是什么？")),
}

TELL_ME = ("介绍一下{n}。", "你知道{n}吗？", "{n}是谁？", "请简单介绍{n}。")
TELL_ME_ENTITY = ("介绍一下{n}。", "你了解{n}吗？", "请简单介绍{n}。")

REFUSALS = (
    "我没有关于{n}的任何信息。",
    "我不知道{n}，也没有相关信息，所以无法回答。",
    "我没有听说过{n}，不想凭空猜测。",
)

INSTRUCTIONS = {
    "lang": "请用英文回答。",
    "upper": "",  # capital letters exist only in English
    "json": '请用JSON格式回答，只包含一个键"answer"。',
    "sentence": "请用一句完整的话回答。",
    "one_word": "请只用一个词回答。",
    "number_only": "只回答数字即可。",
}

COT_SUFFIX = ("请一步一步地思考。", "请逐步推理。", "请写出推理步骤。")
DIRECT_SUFFIX = ("只给出答案。", "请直接回答。", "只要答案就行。")
ANSWER_PREFIX = "答案："
STEP_JOIN = "\n"  # between the steps of a worked solution (render_en.STEP_JOIN: Chinese has no spaced ids)

SYSTEM_PROMPTS = (
    "你是tinychat，一个乐于助人的助手。",
    "你是一个有用的助手，请简洁作答。",
    "你是tinychat。请准确回答问题，不知道时请直说。",
)


def pronouns(gender: str) -> dict[str, str]:
    return {"ta": "她" if gender == "f" else "他"}
