"""The demo's corpus: deterministic Japanese and English documents built from templates and word lists.

No downloads: `documents(n, lang, seed)` gives the same text on every machine (random.Random seeded with an
int, no hashing of str). Mostly Japanese, like Tanuki's data. Each document is 4-8 sentences drawn without
repetition from the templates, with places, people, topics, loanwords, numbers and dates filled in, so the
documents pass data_shards' quality filters (no repeated lines or n-gram spam) and are not near-duplicates
of each other (MinHash over character 5-grams sees different fillers in every sentence).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

JA_PLACES = ("東京", "大阪", "京都", "札幌", "福岡", "名古屋", "横浜", "神戸", "仙台", "広島", "那覇", "金沢", "長崎",
             "奈良", "新潟", "静岡", "熊本", "松山", "高松", "岡山", "盛岡", "青森", "秋田", "富山", "長野", "函館",
             "旭川", "姫路", "倉敷", "下関", "鎌倉", "日光", "別府", "宮島")
JA_PEOPLE = ("田中さん", "佐藤さん", "鈴木先生", "高橋教授", "伊藤部長", "渡辺さん", "山本氏", "中村研究員", "小林さん",
             "加藤社長", "吉田さん", "山田先生", "松本さん", "井上教授", "木村さん", "林さん", "清水代表", "森さん",
             "池田さん", "橋本課長", "石川さん", "前田准教授", "藤田さん", "岡田さん", "後藤さん", "村上さん")
JA_NOUNS = ("経済", "研究", "技術", "教育", "環境", "社会", "文化", "歴史", "政策", "市場", "地域", "医療", "農業",
            "交通", "観光", "情報", "科学", "産業", "気候", "資源", "言語", "実験", "調査", "開発", "設計", "物流",
            "金融", "建築", "音楽", "美術", "文学", "数学", "物理", "化学", "生物", "天文", "海洋", "森林", "漁業",
            "電力", "通信", "鉄道", "航空", "宇宙", "防災", "福祉", "介護", "雇用", "人口", "住宅", "貿易", "食品",
            "栄養", "睡眠", "健康", "図書館", "博物館", "公園", "火山", "地震", "台風", "生態系", "遺伝子", "病院",
            "大学", "翻訳", "出版", "新聞", "放送", "映画", "料理", "陶芸", "書道", "茶道", "庭園", "哲学", "心理",
            "地質", "畜産", "半導体", "自動車", "保育", "労働", "少子化", "高齢化", "都市計画", "税制", "外交", "選挙",
            "司法", "憲法", "運動", "河川", "温暖化", "微生物", "細胞", "免疫", "薬品", "高校", "小学校", "幼稚園",
            "演劇", "伝統工芸", "刺繍", "織物", "漆器", "和菓子", "日本酒", "味噌", "醤油", "寿司", "蕎麦", "温泉",
            "祭り", "神社", "寺院", "城下町", "港湾", "灯台", "棚田", "果樹園", "牧場", "養殖", "造船", "鉄鋼",
            "繊維", "印刷", "広告", "保険", "証券", "会計", "統計", "気象", "測量", "考古学", "民俗学", "植物学",
            "動物園", "水族館", "美容", "服飾", "写真", "彫刻", "建築史", "航海", "登山", "釣り", "園芸", "囲碁",
            "将棋", "俳句", "短歌", "落語", "歌舞伎", "能楽", "狂言", "盆栽", "茶畑", "酪農", "林業", "鉱業")
JA_KATAKANA = ("コンピューター", "データ", "ネットワーク", "ソフトウェア", "アルゴリズム", "プロジェクト", "サービス",
               "システム", "デザイン", "エネルギー", "インターネット", "スマートフォン", "アプリ", "クラウド",
               "センサー", "ロボット", "カメラ", "レストラン", "ホテル", "コーヒー", "チーム", "イベント",
               "コミュニティ", "ボランティア", "トレーニング", "バッテリー", "ドローン", "ワークショップ", "セミナー",
               "ライブラリ", "サーバー", "タブレット", "ゲーム", "アニメ", "マンガ", "マラソン", "ピアノ", "ギター",
               "ミュージアム", "ギャラリー", "アンケート", "インタビュー", "レポート", "ニュース", "フォーラム",
               "キャンプ", "サイクリング", "ジョギング", "ヨガ", "バレエ", "オペラ", "ミュージカル", "ドラマ", "ラジオ",
               "ポスター", "パンフレット", "カタログ", "ガイドブック", "マップ", "アーカイブ", "ポッドキャスト",
               "シミュレーション", "プロトタイプ", "パネル", "モニター", "プリンター", "スキャナー", "ルーター",
               "チャットボット", "メタバース", "ブロックチェーン", "サプリメント", "ワクチン", "リハビリ",
               "カウンセリング", "パン屋", "カフェ", "ベーカリー", "マルシェ", "フェスティバル", "コンテスト",
               "トーナメント", "リーグ")
JA_ADJ = ("新しい", "大きな", "重要な", "便利な", "複雑な", "静かな", "有名な", "身近な", "効率的な", "持続可能な",
          "画期的な", "伝統的な", "古い", "小さな", "難しい", "面白い", "美しい", "安全な", "柔軟な", "具体的な",
          "本格的な", "独自の", "大規模な", "地道な", "先進的な", "意外な", "深刻な", "明るい", "賑やかな")
JA_VERBS = ("発表しました", "開始しました", "導入しました", "検討しています", "改善されました", "拡大しています",
            "注目されています", "紹介しました", "実施されました", "確認されました", "報告されています",
            "議論されています", "提案しました", "公開しました", "完成しました", "再開しました", "強化しています",
            "見直されています", "広がっています", "求められています", "評価されました", "採用されました")
JA_REASONS = ("費用を抑えるため", "利用者の声を受けて", "安全性を高めるため", "若い世代を呼び込むため",
              "作業を減らすため", "地元の要望に応えて", "海外からの関心が高まったため", "古い設備が限界を迎えたため",
              "住民の意見を反映するため", "品質を安定させるため", "災害に備えるため")
JA_COUNTERS = ("人", "件", "社", "台", "回", "か所", "種類", "校", "冊")
JA_SENTENCES = (
    "{year}年、{place}の{noun}分野では{adj}{kata}が{verb}。",
    "{person}によると、{noun}と{noun2}の関係はこれまで考えられていたよりも密接だという。",
    "この{kata}は{reason}、{place}市内の{num}{counter}で試験的に使われている。",
    "関係者は「まだ課題は多いが、{noun}の将来にとって大きな一歩だ」と話している。",
    "{month}月{day}日には、{place}で{noun}に関する{kata}が開かれ、約{num}人が参加した。",
    "{noun}の専門家である{person}は、{adj}{kata}の重要性を繰り返し強調してきた。",
    "調査の結果、回答者の{pct}%が{noun2}について「よく知らない」と答えたことがわかった。",
    "一方で、{noun}にかかる費用は前年より{pct}%増えており、自治体の負担が課題となっている。",
    "{place}に住む{person}は、毎朝{kata}を使って{noun}のニュースを確認するのが日課だそうだ。",
    "もともと{noun}は{place}の地場産業として発展し、{year}年ごろから全国に知られるようになった。",
    "今回の取り組みでは、{noun2}の知識を持つ学生たちが{kata}の作成を手伝った。",
    "なぜ{noun}がこれほど注目されるのでしょうか。",
    "その背景には、{adj}{kata}の普及と、{noun2}をめぐる意識の変化があります。",
    "{person}は「{noun}を学ぶことは、{noun2}を理解することにもつながる」と語った。",
    "{place}の駅前には、{noun}をテーマにした{adj}{kata}が新たに設けられた。",
    "専門家の間では、{noun}の{adj}変化が{noun2}にも影響すると考えられている。",
    "来年度には、{place}と{place2}を結ぶ{kata}の計画も進められる予定だ。",
    "{num}{counter}の応募の中から、{person}の{adj}案が選ばれた。",
    "市の担当者は、{reason}{noun}の制度を見直す方針を示した。",
    "わたしたちの暮らしの中でも、{noun}は意外なところで役に立っています。",
    "たとえば、{kata}を使えば{noun2}の情報を手軽に調べることができます。",
    "{year}年に始まった{noun}の{kata}は、今では{num}{counter}を超える規模に成長した。",
    "{place2}出身の{person}は、子どものころから{noun}に興味を持っていたという。",
    "今後も{noun}と{noun2}の両立をどう図るかが問われることになりそうだ。",
)

EN_PLACES = ("Boston", "Denver", "Leeds", "Austin", "Perth", "Dublin", "Oslo", "Seattle", "Glasgow", "Toronto",
             "Chicago", "Madrid", "Lisbon", "Auckland", "Cardiff", "Vienna")
EN_PEOPLE = ("Dr. Smith", "Ms. Patel", "Professor Chen", "Mr. Garcia", "Dr. Okafor", "Ms. Novak", "Mr. Larsen",
             "Professor Reyes", "Dr. Kim", "Ms. Murphy")
EN_NOUNS = ("energy", "education", "transport", "public health", "farming", "software", "housing", "tourism",
            "climate research", "manufacturing", "water supply", "local media", "music education", "rail travel",
            "data science", "forestry", "urban planning", "nutrition", "robotics", "astronomy", "archaeology",
            "beekeeping", "shipbuilding", "journalism", "linguistics", "oceanography", "pharmacology", "carpentry",
            "photography", "sculpture", "horticulture", "meteorology", "philosophy", "economics", "geology",
            "immunology", "cybersecurity", "aviation", "fisheries", "textiles", "printing", "banking", "insurance",
            "accounting", "statistics", "surveying", "botany", "zoology", "mountaineering", "cycling", "chess",
            "poetry", "theatre", "ballet", "opera", "cinema", "radio", "libraries", "museums", "recycling")
EN_ADJ = ("new", "large", "careful", "modest", "ambitious", "practical", "unusual", "long-term", "local", "costly",
          "experimental", "gradual", "controversial", "popular", "innovative", "sustainable", "cautious", "rapid",
          "remarkable", "generous", "thorough", "informal", "regional", "national", "surprising", "detailed")
EN_SENTENCES = (
    "In {year}, researchers in {place} began a {adj} study of {noun}.",
    "According to {person}, the link between {noun} and {noun2} is stronger than expected.",
    "About {pct} percent of the people surveyed said they rarely think about {noun2}.",
    "The city of {place} plans to spend more on {noun} over the next {num} years.",
    "{person} argues that a {adj} approach to {noun} would help smaller towns the most.",
    "Critics point out that the cost of {noun} has risen by {pct} percent since {year}.",
    "A workshop on {noun} held on {month}/{day} attracted roughly {num} visitors.",
    "Why has {noun} become such a common topic of conversation?",
    "Part of the answer lies in how {noun2} has changed everyday life in {place}.",
    "Officials expect the {adj} programme to reach {place2} by the end of next year.",
)


def _fill(template: str, r: random.Random, lang: str) -> str:
    if lang == "ja":
        places, people, nouns = JA_PLACES, JA_PEOPLE, JA_NOUNS
        extra = {"adj": r.choice(JA_ADJ), "kata": r.choice(JA_KATAKANA), "verb": r.choice(JA_VERBS),
                 "reason": r.choice(JA_REASONS), "counter": r.choice(JA_COUNTERS)}
    else:
        places, people, nouns = EN_PLACES, EN_PEOPLE, EN_NOUNS
        extra = {"adj": r.choice(EN_ADJ)}
    place, place2 = r.sample(places, 2)
    noun, noun2 = r.sample(nouns, 2)
    return template.format(place=place, place2=place2, person=r.choice(people), noun=noun, noun2=noun2,
                           year=r.randint(1990, 2025), month=r.randint(1, 12), day=r.randint(1, 28),
                           num=r.randint(3, 900), pct=r.randint(5, 95), **extra)


def documents(n: int, lang: str, seed: int) -> list[str]:
    """`n` documents of 4-8 sentences (two paragraphs), the same for the same (n, lang, seed)."""
    r = random.Random(seed * 1_000_003 + (0 if lang == "ja" else 7))
    templates = JA_SENTENCES if lang == "ja" else EN_SENTENCES
    sep = "" if lang == "ja" else " "
    docs = []
    for _ in range(n):
        picked = r.sample(templates, r.randint(4, min(8, len(templates))))
        sentences = [_fill(t, r, lang) for t in picked]
        cut = len(sentences) // 2
        docs.append(sep.join(sentences[:cut]) + "\n" + sep.join(sentences[cut:]))
    return docs


def write_corpus(out: Path, ja: int, en: int, seed: int) -> dict[str, Path]:
    """JSONL files {"text": ...} for training (ja.jsonl, en.jsonl) and a held-out eval.jsonl; atomic writes."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"ja": (documents(ja, "ja", seed), out / "ja.jsonl"), "en": (documents(en, "en", seed), out / "en.jsonl"),
             "eval": (documents(max(20, ja // 20), "ja", seed + 1) + documents(max(5, en // 20), "en", seed + 1),
                      out / "eval.jsonl")}
    for docs, path in files.values():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        tmp.replace(path)
    return {k: p for k, (_, p) in files.items()}
