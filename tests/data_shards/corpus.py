"""A deterministic, offline bilingual test corpus: Japanese and English documents built from templates and word
lists, plus generators of the bad documents the filters and dedup must catch.

Every function takes a seed and gives the same text on every machine (random.Random, no hashing of str).
Documents are 3-5 paragraphs of 3-5 sentences (roughly 500-900 Japanese characters, 1,500-2,500 English
characters), with numbers, dates, punctuation, kanji compounds, katakana loanwords and hiragana particles, so
that a SentencePiece model trained on them sees a varied vocabulary. Within a document no sentence template is
used twice, so good documents pass the repetition filters.

    japanese_documents(200, seed=0)  english_documents(200, seed=0)  write_jsonl(path, docs)
    bad: too_short_document, repeated_lines_document, ngram_spam_document, symbol_spam_document,
         number_table_document, near_duplicate, exact_duplicate, korean_documents, russian_documents,
         chinese_document, mixed_japanese_english_document
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

# --------------------------------------------------------------------------------------------- Japanese

JA_PLACES = ("東京", "大阪", "京都", "札幌", "福岡", "名古屋", "横浜", "神戸", "仙台", "広島", "那覇", "金沢", "長崎",
             "奈良", "新潟", "静岡", "熊本", "鹿児島", "松山", "高松", "岡山", "盛岡", "青森", "秋田", "山形", "富山",
             "長野", "甲府", "宇都宮", "水戸", "千葉", "埼玉", "岐阜", "津", "大津", "和歌山", "鳥取", "松江", "徳島",
             "高知", "佐賀", "大分", "宮崎", "函館", "旭川", "釧路", "北九州", "堺", "川崎", "相模原", "浜松", "姫路",
             "倉敷", "下関")
JA_PEOPLE = ("田中", "佐藤", "鈴木", "高橋", "伊藤", "渡辺", "山本", "中村", "小林", "加藤", "吉田", "山田", "佐々木",
             "山口", "松本", "井上", "木村", "林", "清水", "山崎", "森", "池田", "橋本", "阿部", "石川", "前田", "藤田",
             "小川", "岡田", "後藤", "長谷川", "村上", "近藤", "石井", "坂本", "遠藤", "青木", "藤井", "西村", "福田")
JA_TITLES = ("さん", "先生", "教授", "部長", "課長", "社長", "氏", "准教授", "研究員", "代表")
JA_NOUNS = ("経済", "研究", "技術", "教育", "環境", "社会", "文化", "歴史", "政策", "市場", "地域", "医療", "農業",
            "交通", "観光", "情報", "科学", "産業", "気候", "資源", "言語", "計算", "実験", "調査", "開発", "設計",
            "製造", "物流", "金融", "保険", "建築", "音楽", "美術", "文学", "哲学", "心理", "数学", "物理", "化学",
            "生物", "天文", "地質", "海洋", "森林", "漁業", "畜産", "電力", "通信", "半導体", "自動車", "鉄道",
            "航空", "宇宙", "防災", "福祉", "介護", "保育", "雇用", "労働", "人口", "少子化", "高齢化", "都市計画",
            "住宅", "税制", "貿易", "外交", "選挙", "司法", "憲法", "食品", "栄養", "睡眠", "運動", "健康", "図書館",
            "博物館", "公園", "河川", "火山", "地震", "台風", "温暖化", "生態系", "微生物", "遺伝子", "細胞", "免疫",
            "薬品", "病院", "大学", "高校", "小学校", "幼稚園", "翻訳", "出版", "新聞", "放送", "映画", "演劇",
            "料理", "伝統工芸", "陶芸", "書道", "茶道", "庭園")
JA_KATAKANA = ("コンピューター", "データ", "ネットワーク", "ソフトウェア", "アルゴリズム", "プロジェクト", "サービス",
               "システム", "デザイン", "マーケティング", "エネルギー", "インターネット", "スマートフォン", "アプリ",
               "クラウド", "セキュリティ", "プログラム", "モデル", "センサー", "ロボット", "カメラ", "レストラン",
               "ホテル", "コーヒー", "チーム", "イベント", "スケジュール", "コミュニティ", "ボランティア",
               "トレーニング", "バッテリー", "ドローン", "プラットフォーム", "インフラ", "ワークショップ", "セミナー",
               "パートナー", "ビジネス", "マニュアル", "テキスト", "ライブラリ", "サーバー", "ブラウザ", "キーボード",
               "ディスプレイ", "メモリ", "パソコン", "タブレット", "ゲーム", "アニメ", "マンガ", "スポーツ",
               "サッカー", "テニス", "マラソン", "ピアノ", "ギター", "オーケストラ", "ミュージアム", "ギャラリー",
               "スーパー", "コンビニ", "デパート", "キャンペーン", "アンケート", "インタビュー", "レポート",
               "ニュース", "メディア", "フォーラム", "ガイドライン")
JA_ADJ = ("新しい", "大きな", "重要な", "便利な", "複雑な", "静かな", "有名な", "身近な", "効率的な", "持続可能な",
          "画期的な", "伝統的な", "古い", "小さな", "難しい", "面白い", "美しい", "安全な", "柔軟な", "具体的な",
          "本格的な", "独自の", "大規模な", "小規模な", "地道な", "先進的な", "意外な", "深刻な", "明るい",
          "賑やかな")
JA_VERBS = ("発表しました", "開始しました", "導入しました", "検討しています", "改善されました", "拡大しています",
            "注目されています", "紹介しました", "実施されました", "確認されました", "報告されています",
            "議論されています", "提案しました", "公開しました", "完成しました", "延期されました", "再開しました",
            "強化しています", "見直されています", "受け入れられています", "広がっています", "求められています",
            "評価されました", "採用されました", "整備されました", "縮小しました", "計画しています",
            "話題になりました")
JA_REASONS = ("費用を抑えるため", "利用者の声を受けて", "安全性を高めるため", "若い世代を呼び込むため",
              "作業を減らすため", "地元の要望に応えて", "海外からの関心が高まったため", "国の補助金が決まったため",
              "古い設備が限界を迎えたため", "住民の意見を反映するため", "品質を安定させるため", "災害に備えるため")
JA_COUNTERS = ("人", "件", "社", "台", "回", "か所", "種類", "校", "冊", "本")
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
    "専門家の間では、{noun}の効果をもっと長い期間で測るべきだという意見も根強い。",
    "{person}は「{place}らしさを残しながら、{noun2}を少しずつ変えていきたい」と語った。",
    "この制度は{year}年に始まり、これまでに{num}{counter}が利用している。",
    "ただし、{kata}の導入には時間がかかり、すべての地域で同じ成果が出るわけではない。",
    "{noun}を学ぶ人にとって、{place}の{noun2}は格好の教材だといえるだろう。",
    "市の担当者は、{month}月までに{kata}の利用状況をまとめて公表する予定だ。",
    "実際に使ってみると、思っていたよりずっと操作が簡単で驚きました。",
    "ところが、{noun2}の現場では人手不足が続いており、{adj}工夫が欠かせない。",
    "{place}の駅前には{kata}を備えた{noun}の施設が新しく建てられた。",
    "研究チームは{num}件のデータを分析し、{noun}と{noun2}の間に弱い相関があることを示した。",
    "参加者からは「{kata}の説明がわかりやすかった」という感想が多く寄せられた。",
    "今後は{noun}だけでなく、{noun2}や{noun3}の分野にも応用を広げる方針だ。",
    "{person}の研究室では、{kata}を使った{adj}実験が毎週のように行われている。",
    "昔ながらの{noun}を守りたいという声と、変化を求める声がぶつかることも少なくない。",
    "私たちにできることは、まず身近な{noun}について知ることかもしれません。",
    "{year}年の統計では、{place}の{noun2}に関わる人は約{num}人にのぼった。",
    "{reason}、{place}県は{noun}の窓口を一本化した。",
    "この話を聞いたとき、正直なところ少し不安もありました。",
    "{kata}の価格は{num}円ほどで、以前の製品に比べて手に取りやすくなった。",
    "{noun}に詳しい{person}は、{noun2}との両立が鍵になると指摘する。",
    "週末になると、{place}の{kata}には家族連れや観光客が集まり、にぎわいを見せる。",
    "来年度からは、{noun}の授業に{kata}を取り入れる学校も増える見込みだ。",
    "記録によれば、{month}月の平均気温は平年より{small}度高く、{noun2}にも影響が出た。",
    "こうした変化は、{noun}の在り方そのものを問い直すきっかけになっている。",
    "{person}は{place}出身で、大学では{noun}を専攻し、その後{noun2}の仕事に就いた。",
    "結局のところ、大切なのは{noun}を続けられる仕組みをつくることだ。",
    "ちなみに、{kata}という言葉が日本で広く使われるようになったのは{decade}年代以降のことだ。",
    "{place}と{place2}を結ぶ{noun}の計画は、{reason}見直しが進められている。",
    "その日は朝から雨が降っていたが、会場の{kata}は満員だった。",
    "{noun}に関する相談は、{month}月だけで{num}件を超えた。",
    "小さな{kata}から始めて、少しずつ{noun2}を広げていくのが現実的だろう。",
    "まとめると、{noun}の課題は技術よりも、人と人のつながりにあるのかもしれない。",
)
JA_HEADINGS = ("{place}で{noun}の新たな試み", "{noun}と{kata}のこれから", "{person}に聞く{noun2}の現在",
               "{year}年の{noun}を振り返る", "{adj}{kata}が変える{noun}")


def _ja_fill(template: str, r: random.Random) -> str:
    nouns = r.sample(JA_NOUNS, 3)
    places = r.sample(JA_PLACES, 2)
    return template.format(
        place=places[0], place2=places[1], noun=nouns[0], noun2=nouns[1], noun3=nouns[2],
        person=r.choice(JA_PEOPLE) + r.choice(JA_TITLES), kata=r.choice(JA_KATAKANA), adj=r.choice(JA_ADJ),
        verb=r.choice(JA_VERBS), reason=r.choice(JA_REASONS), counter=r.choice(JA_COUNTERS),
        year=r.randint(1950, 2025), decade=r.randrange(1950, 2030, 10), month=r.randint(1, 12),
        day=r.randint(1, 28), num=f"{r.randint(2, 98000):,}",
        pct=r.randint(3, 87), small=f"{r.uniform(0.3, 3.5):.1f}")


def _document(r: random.Random, templates: tuple[str, ...], headings: tuple[str, ...], fill, sep: str) -> str:
    order = r.sample(templates, len(templates))  # each template at most once per document
    paragraphs, at = [], 0
    for _ in range(r.randint(3, 5)):
        k = r.randint(3, 5)
        paragraphs.append(sep.join(fill(t, r) for t in order[at: at + k]))
        at += k
    return fill(r.choice(headings), r) + "\n\n" + "\n\n".join(paragraphs)


def japanese_documents(n: int, seed: int = 0) -> list[str]:
    """`n` distinct Japanese documents (a heading line, then 3-5 paragraphs separated by blank lines)."""
    r = random.Random(f"ja-{seed}")
    return [_document(r, JA_SENTENCES, JA_HEADINGS, _ja_fill, "") for _ in range(n)]


# ---------------------------------------------------------------------------------------------- English

EN_PLACES = ("Portland", "Edinburgh", "Melbourne", "Toronto", "Denver", "Bristol", "Auckland", "Dublin", "Austin",
             "Vancouver", "Glasgow", "Adelaide", "Boston", "Leeds", "Ottawa", "Seattle", "Cardiff", "Perth",
             "Chicago", "Halifax", "Brisbane", "Nashville", "Belfast", "Winnipeg", "Phoenix", "Oxford", "Hobart",
             "Pittsburgh", "Manchester", "Calgary", "Sacramento", "Liverpool", "Montreal", "Baltimore", "York")
EN_FIRST = ("Alice", "Marcus", "Priya", "Tomás", "Hannah", "Kwame", "Ingrid", "Rafael", "Mei", "Oliver", "Fatima",
            "Jonas", "Lucia", "Samuel", "Aiko", "Dmitri", "Grace", "Hugo", "Nadia", "Ethan", "Zara", "Felix",
            "Chloe", "Arjun", "Maya", "Leon", "Sofia", "Gabriel", "Elena", "Noah")
EN_LAST = ("Moreno", "Whitfield", "Okafor", "Lindqvist", "Chandra", "Brennan", "Kowalski", "Tanaka", "Alvarez",
           "Fischer", "Nakamura", "O'Connell", "Haddad", "Petrov", "Sinclair", "Dubois", "Castillo", "Mwangi",
           "Larsen", "Romano", "Bianchi", "Gallagher", "Novak", "Ferreira", "Hughes", "Schmidt", "Delgado")
EN_ROLES = ("a historian", "an economist", "a software engineer", "a marine biologist", "a city planner",
            "a nurse", "a high-school teacher", "a volcanologist", "a librarian", "a farmer", "an architect",
            "a data scientist", "a union organiser", "a museum curator", "a civil engineer", "a chef")
EN_NOUNS = ("housing", "transit", "agriculture", "education", "public health", "renewable energy", "broadband",
            "water management", "tourism", "manufacturing", "fisheries", "forestry", "healthcare", "childcare",
            "recycling", "wildfire prevention", "flood defence", "archaeology", "astronomy", "linguistics",
            "robotics", "battery chemistry", "genomics", "climate modelling", "urban gardening", "cybersecurity",
            "supply chains", "microfinance", "public libraries", "rail freight", "coastal erosion", "beekeeping",
            "vaccine research", "machine translation", "open-source software", "soil science", "air quality",
            "migration policy", "language learning", "mental health", "sports medicine", "textile design")
EN_ADJ = ("ambitious", "modest", "controversial", "long-awaited", "experimental", "affordable", "practical",
          "surprising", "promising", "costly", "innovative", "cautious", "sweeping", "local", "national",
          "unusual", "well-funded", "small-scale", "community-led", "data-driven", "overdue", "remarkable")
EN_THINGS = ("pilot programme", "survey", "prototype", "report", "database", "workshop", "grant scheme",
             "field study", "mobile app", "training course", "sensor network", "public consultation",
             "open dataset", "research station", "mentoring scheme", "festival", "exhibition", "partnership")
EN_VERBS = ("announced", "launched", "expanded", "postponed", "reviewed", "funded", "criticised", "published",
            "completed", "redesigned", "tested", "abandoned", "approved", "evaluated", "revived", "scaled back")
EN_REASONS = ("to cut running costs", "after complaints from residents", "because demand kept rising",
              "to meet new safety rules", "after a successful trial", "because the old system was failing",
              "to attract younger visitors", "in response to last winter's storms", "to share data more openly")
EN_SENTENCES = (
    "In {year}, the city of {place} {verb} an {adj} {thing} focused on {noun}.",
    "According to {person}, {role} based in {place}, the results were better than anyone expected.",
    "The {thing} cost roughly ${money} and involved {num} participants over {months} months.",
    "Critics argue that {noun} deserves far more attention than it currently receives.",
    "\"We are still learning what works,\" {person} said during a briefing on {month} {day}.",
    "Nearly {pct}% of respondents said they had never heard of the programme before.",
    "The idea is not new: similar projects in {place2} date back to the early {decade}s.",
    "What makes this effort different is its emphasis on {noun2} rather than {noun}.",
    "Officials {verb} the plan {reason}, although several details remain unclear.",
    "For many families, the change will be felt most directly through lower bills and shorter waits.",
    "{person}, who has worked in {noun} for {small} years, describes the mood as cautiously optimistic.",
    "A second phase, scheduled for {year2}, would extend the {thing} to {num} more neighbourhoods.",
    "Why has {noun} become such a pressing issue?",
    "Part of the answer lies in rising costs; another part lies in shifting public expectations.",
    "Researchers analysed {num} records and found a weak but consistent link between {noun} and {noun2}.",
    "Local businesses were initially sceptical, but most now say the {thing} has helped them.",
    "Not everyone is convinced, and some residents have organised petitions against the scheme.",
    "The council's own figures show a {pct}% increase in applications since {year}.",
    "Volunteers spent the weekend of {month} {day} mapping every {noun2} site in the district.",
    "{person} put it simply: \"If we do nothing, the problem only gets harder.\"",
    "The final report, running to {pages} pages, recommends a {adj} approach to {noun}.",
    "Students from the university in {place} helped design the {thing} and collect the data.",
    "In practice, the hardest part has been finding people with the right skills.",
    "Funding comes from a mix of national grants, private donors and a small local levy.",
    "By {year2}, organisers hope the {thing} will pay for itself.",
    "Visitors to {place} can now see the {thing} in action at the old harbour warehouse.",
    "There is also an educational angle: schools have started using the {thing} in science lessons.",
    "Similar schemes elsewhere have struggled, often because they grew too quickly.",
    "{person} remains hopeful, noting that \"{noun} has always moved in small steps.\"",
    "Temperatures that {month} were {small} degrees above average, which complicated the fieldwork.",
    "The project's website lists {num} partner organisations, from charities to start-ups.",
    "Some of the most useful feedback came from people who had never taken part in {noun} before.",
    "If the pilot succeeds, it could become a model for {noun2} programmes across the region.",
    "Still, the numbers tell only part of the story.",
    "Ask anyone at the {thing} what they value most, and they will usually mention the people.",
    "One unexpected benefit was a sharp drop in paperwork for {role}.",
    "Engineers replaced {num} ageing components during the upgrade, finishing two weeks early.",
    "The debate over {noun} is likely to continue well into the next election cycle.",
    "A spokesperson declined to comment on the budget for {year2}.",
    "In short, {noun} is no longer a niche concern but a question for everyone in {place}.",
    "Earlier attempts in {decade} failed largely because of poor coordination between agencies.",
    "The team published its methods openly so that others in {place2} could repeat the study.",
    "On a quiet Tuesday morning, a handful of volunteers were already sorting equipment.",
    "Those involved say the biggest change is cultural rather than technical.",
)
EN_HEADINGS = ("{place} bets on {noun}", "What the {thing} taught us about {noun}", "A closer look at {noun2}",
               "{adj} {thing} divides opinion in {place}", "The quiet revival of {noun}")
EN_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December")


def _en_fill(template: str, r: random.Random) -> str:
    nouns = r.sample(EN_NOUNS, 2)
    places = r.sample(EN_PLACES, 2)
    adj = r.choice(EN_ADJ)
    text = template.format(
        place=places[0], place2=places[1], noun=nouns[0], noun2=nouns[1], adj=adj, thing=r.choice(EN_THINGS),
        verb=r.choice(EN_VERBS), reason=r.choice(EN_REASONS), role=r.choice(EN_ROLES),
        person=f"{r.choice(EN_FIRST)} {r.choice(EN_LAST)}", year=r.randint(1960, 2024), year2=r.randint(2025, 2035),
        decade=r.randrange(1950, 2020, 10), month=r.choice(EN_MONTHS), day=r.randint(1, 28),
        num=f"{r.randint(12, 48000):,}", pct=r.randint(3, 87), money=f"{r.randint(20, 9000) * 1000:,}",
        months=r.randint(3, 36), small=r.randint(2, 40), pages=r.randint(40, 400))
    if " an " in text and adj[0] not in "aeiou":
        text = text.replace(f" an {adj}", f" a {adj}")
    return text[0].upper() + text[1:]


def english_documents(n: int, seed: int = 0) -> list[str]:
    """`n` distinct English documents (a heading line, then 3-5 paragraphs separated by blank lines)."""
    r = random.Random(f"en-{seed}")
    return [_document(r, EN_SENTENCES, EN_HEADINGS, _en_fill, " ") for _ in range(n)]


# ----------------------------------------------------------------------------------------- other scripts

KO_SENTENCES = ("오늘 {n}명의 시민이 새로운 도서관 개관식에 참석했습니다.",
                "연구진은 기후 변화가 농업에 미치는 영향을 조사했습니다.",
                "이 프로그램은 {n}년부터 지역 학생들에게 무료로 제공되고 있습니다.",
                "전문가들은 앞으로 더 많은 투자가 필요하다고 말했습니다.",
                "시장은 교통 문제를 해결하기 위해 새로운 계획을 발표했습니다.",
                "주민들은 공원이 깨끗해져서 매우 기쁘다고 전했습니다.",
                "회사는 올해 매출이 {n}퍼센트 증가했다고 밝혔습니다.",
                "많은 관광객이 주말마다 이 작은 마을을 찾고 있습니다.")
RU_SENTENCES = ("Сегодня {n} жителей города пришли на открытие новой библиотеки.",
                "Исследователи изучили влияние изменения климата на сельское хозяйство.",
                "Программа работает с {n} года и бесплатна для местных школьников.",
                "Эксперты считают, что в будущем потребуются дополнительные инвестиции.",
                "Мэр объявил новый план по решению транспортных проблем.",
                "Жители рассказали, что очень рады чистому и уютному парку.",
                "Компания сообщила, что выручка выросла на {n} процентов за год.",
                "Каждые выходные небольшой город посещают многочисленные туристы.")


def _other_documents(sentences: tuple[str, ...], n: int, seed: int, tag: str) -> list[str]:
    r = random.Random(f"{tag}-{seed}")
    docs = []
    for _ in range(n):
        paras = [" ".join(s.format(n=r.randint(2, 2024)) for s in r.sample(sentences, 4)) for _ in range(3)]
        docs.append("\n\n".join(paras))
    return docs


def korean_documents(n: int, seed: int = 0) -> list[str]:
    """Korean (Hangul) documents: detect_language -> "other"."""
    return _other_documents(KO_SENTENCES, n, seed, "ko")


def russian_documents(n: int, seed: int = 0) -> list[str]:
    """Russian (Cyrillic) documents: detect_language -> "other"."""
    return _other_documents(RU_SENTENCES, n, seed, "ru")


def chinese_document() -> str:
    """Simplified Chinese: hanzi only, no kana -> "other" (not Japanese)."""
    return ("今天有很多市民参加了新图书馆的开幕仪式。研究人员调查了气候变化对农业的影响。专家们表示未来需要更多的投资。"
            "市长宣布了解决交通问题的新计划。居民们说公园变得干净以后他们非常高兴。公司表示今年的销售额增长了百分之十二。")


def mixed_japanese_english_document() -> str:
    """Japanese with many English technical words: still "ja"."""
    return ("今日はPythonとPyTorchを使って、Transformerモデルのfine-tuningを試しました。"
            "GPUはNVIDIAのH100で、batch sizeは32、learning rateは3e-4に設定しています。"
            "途中でCUDA out of memoryのエラーが出たので、gradient checkpointingを有効にしました。"
            "結果はTensorBoardで確認でき、lossは順調に下がっていきました。")


# -------------------------------------------------------------------------------------------- bad docs


def too_short_document(lang: str = "ja") -> str:
    """A caption-length text: quality_reason -> "too_short"."""
    return "本日の天気は晴れです。" if lang == "ja" else "Sunny today."


def repeated_lines_document(lang: str = "ja", seed: int = 0) -> str:
    """Three lines repeated eight times (boilerplate, navigation menus): -> "duplicate_lines"."""
    r = random.Random(f"lines-{lang}-{seed}")
    fill, sents = (_ja_fill, JA_SENTENCES) if lang == "ja" else (_en_fill, EN_SENTENCES)
    lines = [fill(t, r) for t in r.sample(sents, 3)]
    return "\n".join(lines * 8)


def ngram_spam_document(lang: str = "ja", seed: int = 0) -> str:
    """Keyword spam whose lines differ (a running number) but whose phrases repeat: -> "ngram_repetition"."""
    r = random.Random(f"spam-{lang}-{seed}")
    if lang == "ja":
        phrase = "格安ホテル予約なら当サイトへ最安値保証で今すぐ予約できます"
        return "\n".join(f"{phrase}{r.choice(JA_PLACES)}のホテル{i}番" for i in range(30))
    phrase = "buy cheap hotel rooms online best price guaranteed book now and save"
    return "\n".join(f"{phrase} in {r.choice(EN_PLACES)} offer {i}" for i in range(30))


def symbol_spam_document(lang: str = "ja", seed: int = 0) -> str:
    """A good document with decoration symbols (★☆■♪→) after every few characters: -> "symbol_ratio"."""
    r = random.Random(f"sym-{lang}-{seed}")
    base = (japanese_documents if lang == "ja" else english_documents)(1, seed=1000 + seed)[0]
    step = 3 if lang == "ja" else 6
    return "".join(c + (r.choice("★☆■♪→◆") if i % step == step - 1 else "") for i, c in enumerate(base))


def number_table_document(seed: int = 0) -> str:
    """Rows of figures with one word of header: letters are under 60% of the characters -> "letter_ratio"."""
    r = random.Random(f"table-{seed}")
    rows = [f"{r.randint(1990, 2024)} {r.uniform(0, 100):.2f} {r.randint(0, 10**6):,} {r.uniform(-5, 5):+.3f}"
            for _ in range(20)]
    return "Results\n" + "\n".join(rows)


def near_duplicate(doc: str, seed: int = 0, kind: str = "edit") -> str:
    """`doc` with a small change: kind "edit" replaces three words (English) or three kanji compounds / places
    (Japanese); kind "append" adds one sentence at the end. Jaccard of 5-gram shingles stays above 0.85."""
    r = random.Random(f"near-{seed}")
    if kind == "append":
        if _is_japanese(doc):
            return doc + "最後に、今後の動向にも引き続き注目したい。"
        return doc + " We will follow up on this next month."
    if kind != "edit":
        raise ValueError(f"near_duplicate: kind must be 'edit' or 'append', got {kind!r}")
    words = JA_NOUNS + JA_PLACES if _is_japanese(doc) else EN_NOUNS + EN_PLACES
    present = [w for w in words if w in doc]
    for old in r.sample(present, min(3, len(present))):
        doc = doc.replace(old, r.choice(words), 1)
    return doc


def exact_duplicate(doc: str) -> str:
    """The same document with Windows line endings and trailing spaces: identical after normalize()."""
    return doc.replace("\n", "  \r\n")


def _is_japanese(doc: str) -> bool:
    return any("\u3040" <= c <= "\u30ff" for c in doc)


# ------------------------------------------------------------------------------------------------- files


def write_jsonl(path: str | Path, docs: Iterable[str], field: str = "text") -> Path:
    """Writes one JSON object per line ({field: doc}), UTF-8, non-ASCII kept as is. Returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc}, ensure_ascii=False) + "\n")
    return path
