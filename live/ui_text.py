"""The dashboard's own words in Chinese, Russian and English.

Cause titles, facts, actions and decisions come from the playbook (:mod:`core.playbook`); this
table holds the page's labels. :func:`texts` gives one language's table, each key present in
every language (a test checks), so a template never shows a key instead of a word.
"""

from __future__ import annotations

LANGUAGE_NAMES = {"zh": "中文", "ru": "Русский", "en": "English"}

_TEXT: dict[str, dict[str, str]] = {
    "app": {"en": "Cancellation risk", "zh": "取消风险", "ru": "Риск отмены"},
    "skip": {"en": "Skip to content", "zh": "跳到正文", "ru": "К содержанию"},
    "nav_orders": {"en": "Open orders", "zh": "在途订单", "ru": "Открытые заказы"},
    "nav_causes": {"en": "Causes", "zh": "原因分析", "ru": "Причины"},
    "language": {"en": "Language", "zh": "语言", "ru": "Язык"},
    "logout": {"en": "Log out", "zh": "退出", "ru": "Выйти"},
    "login_title": {"en": "Log in", "zh": "登录", "ru": "Вход"},
    "login_intro": {
        "en": "Enter the API key of this service. It is checked once; the browser then keeps "
        "a session for {hours:.0f} hours.",
        "zh": "请输入本服务的 API 密钥。密钥只校验一次，之后浏览器保持 {hours:.0f} 小时的会话。",
        "ru": "Введите API-ключ сервиса. Он проверяется один раз, затем браузер хранит сессию "
        "{hours:.0f} ч.",
    },
    "api_key": {"en": "API key", "zh": "API 密钥", "ru": "API-ключ"},
    "login_button": {"en": "Log in", "zh": "登录", "ru": "Войти"},
    "login_failed": {
        "en": "This key is not valid.",
        "zh": "密钥无效。",
        "ru": "Ключ недействителен.",
    },
    "orders_title": {"en": "Open orders", "zh": "在途订单", "ru": "Открытые заказы"},
    "as_of": {"en": "as of", "zh": "截至", "ru": "на"},
    "level_high": {"en": "High", "zh": "高", "ru": "Высокий"},
    "level_medium": {"en": "Medium", "zh": "中", "ru": "Средний"},
    "level_low": {"en": "Low", "zh": "低", "ru": "Низкий"},
    "level_unscored": {"en": "Not scored yet", "zh": "尚未评分", "ru": "Ещё не оценён"},
    "counts": {"en": "Open orders by risk", "zh": "按风险统计在途订单", "ru": "Заказы по риску"},
    "filters": {"en": "Filters", "zh": "筛选", "ru": "Фильтры"},
    "risk": {"en": "Risk", "zh": "风险", "ru": "Риск"},
    "carrier": {"en": "Carrier", "zh": "承运商", "ru": "Перевозчик"},
    "region": {"en": "Region", "zh": "地区", "ru": "Регион"},
    "payment": {"en": "Payment", "zh": "付款方式", "ru": "Оплата"},
    "decision": {"en": "Decision", "zh": "建议处理", "ru": "Решение"},
    "min_age": {
        "en": "Ordered at least (days ago)",
        "zh": "下单至少（天前）",
        "ru": "Заказ не позже (дней назад)",
    },
    "sort": {"en": "Sort by", "zh": "排序", "ru": "Сортировка"},
    "sort_risk": {"en": "Risk", "zh": "风险", "ru": "Риск"},
    "sort_saving": {"en": "Expected saving", "zh": "预计节省", "ru": "Ожидаемая экономия"},
    "sort_age": {"en": "Age", "zh": "订单时长", "ru": "Возраст"},
    "sort_posting": {"en": "Posting number", "zh": "货件号", "ru": "Номер отправления"},
    "descending": {"en": "Largest first", "zh": "从大到小", "ru": "По убыванию"},
    "any": {"en": "Any", "zh": "全部", "ru": "Любой"},
    "apply": {"en": "Apply", "zh": "应用", "ru": "Применить"},
    "reset": {"en": "Reset", "zh": "重置", "ru": "Сбросить"},
    "posting": {"en": "Posting", "zh": "货件号", "ru": "Отправление"},
    "probability": {"en": "P(buyer cancels)", "zh": "买家取消概率", "ru": "P(отмена покупателем)"},
    "age": {"en": "Age (days)", "zh": "时长（天）", "ru": "Возраст (дн.)"},
    "first_reason": {"en": "Main reason", "zh": "主要原因", "ru": "Главная причина"},
    "first_action": {"en": "First action", "zh": "首要措施", "ru": "Первое действие"},
    "saving": {"en": "Expected saving", "zh": "预计节省", "ru": "Ожидаемая экономия"},
    "table_caption": {
        "en": "{total} open orders match; page {page} of {pages}",
        "zh": "共 {total} 个在途订单符合条件；第 {page} / {pages} 页",
        "ru": "Подходит {total} открытых заказов; страница {page} из {pages}",
    },
    "no_orders": {
        "en": "No open order matches these filters.",
        "zh": "没有符合条件的在途订单。",
        "ru": "Нет открытых заказов с такими условиями.",
    },
    "pages": {"en": "Pages", "zh": "分页", "ru": "Страницы"},
    "previous": {"en": "Previous", "zh": "上一页", "ru": "Назад"},
    "next": {"en": "Next", "zh": "下一页", "ru": "Вперёд"},
    "refreshed": {
        "en": "Refreshes every {seconds:.0f} s",
        "zh": "每 {seconds:.0f} 秒自动刷新",
        "ru": "Обновляется каждые {seconds:.0f} с",
    },
    "pending": {"en": "re-scoring", "zh": "重新评分中", "ru": "пересчёт"},
    "order_title": {"en": "Order {number}", "zh": "订单 {number}", "ru": "Заказ {number}"},
    "status": {"en": "Status", "zh": "状态", "ru": "Статус"},
    "model": {"en": "Model", "zh": "模型", "ru": "Модель"},
    "scored_at": {"en": "Scored at", "zh": "评分时间", "ru": "Оценён на"},
    "timeline": {"en": "Timeline", "zh": "时间线", "ru": "Хронология"},
    "timeline_table": {
        "en": "The timeline as a table",
        "zh": "时间线（表格）",
        "ru": "Хронология таблицей",
    },
    "time": {"en": "Time", "zh": "时间", "ru": "Время"},
    "lane": {"en": "What", "zh": "类型", "ru": "Что"},
    "detail": {"en": "Detail", "zh": "详情", "ru": "Подробности"},
    "lane_status": {"en": "Status", "zh": "状态", "ru": "Статус"},
    "lane_scan": {"en": "Carrier scans", "zh": "物流扫描", "ru": "Сканы перевозчика"},
    "lane_price": {"en": "Price", "zh": "价格", "ru": "Цена"},
    "lane_card": {"en": "Card edits", "zh": "卡片修改", "ru": "Правки карточки"},
    "lane_promise": {"en": "Delivery date", "zh": "送达日期", "ru": "Дата доставки"},
    "now": {"en": "now", "zh": "现在", "ru": "сейчас"},
    "promised_delivery": {
        "en": "promised delivery",
        "zh": "承诺送达",
        "ru": "обещанная доставка",
    },
    "shipment_deadline": {"en": "shipment deadline", "zh": "发货截止", "ru": "срок отгрузки"},
    "vs_paid": {"en": "vs paid", "zh": "相对成交价", "ru": "к цене покупки"},
    "events": {"en": "events", "zh": "个事件", "ru": "событий"},
    "months": {
        "en": "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
        "zh": "1月 2月 3月 4月 5月 6月 7月 8月 9月 10月 11月 12月",
        "ru": "янв фев мар апр мая июн июл авг сен окт ноя дек",
    },
    "reasons": {"en": "Why", "zh": "原因", "ru": "Почему"},
    "share": {"en": "share of the risk", "zh": "占风险比例", "ru": "доля риска"},
    "no_reasons": {
        "en": "Low risk: no reason to act.",
        "zh": "风险低：无需处理。",
        "ru": "Риск низкий: действовать не нужно.",
    },
    "actions": {"en": "What to do", "zh": "建议措施", "ru": "Что сделать"},
    "what_if": {"en": "What if", "zh": "如果这样做", "ru": "Что если"},
    "what_if_intro": {
        "en": "The risk after each action, by the same model and counterfactuals as the "
        "reasons (at {as_of}).",
        "zh": "采取各项措施后的风险，与原因分析使用同一模型和反事实计算（{as_of}）。",
        "ru": "Риск после каждого действия — та же модель и те же контрфакты, что и у причин "
        "(на {as_of}).",
    },
    "action": {"en": "Action", "zh": "措施", "ru": "Действие"},
    "risk_now": {"en": "Risk now", "zh": "当前风险", "ru": "Риск сейчас"},
    "risk_after": {"en": "Risk after", "zh": "措施后风险", "ru": "Риск после"},
    "basis": {"en": "Basis", "zh": "依据", "ru": "Основание"},
    "basis_counterfactual": {
        "en": "the model, with the cause fixed",
        "zh": "模型（消除该原因后）",
        "ru": "модель, причина устранена",
    },
    "basis_assumed_effect": {
        "en": "the effect the shop's cost settings assume",
        "zh": "店铺成本设置中假定的效果",
        "ru": "эффект, заложенный в настройках затрат магазина",
    },
    "no_gain": {
        "en": "not expected to lower the risk",
        "zh": "预计不会降低风险",
        "ru": "риск, по оценке, не снизится",
    },
    "no_what_if": {
        "en": "No action is available for this order now.",
        "zh": "该订单当前没有可采取的措施。",
        "ru": "Для этого заказа сейчас нет доступных действий.",
    },
    "what_if_unavailable": {
        "en": "The what-if cannot be computed now: {why}",
        "zh": "目前无法计算：{why}",
        "ru": "Сейчас рассчитать нельзя: {why}",
    },
    "risk_history": {"en": "Risk history", "zh": "风险变化", "ru": "История риска"},
    "not_found": {
        "en": "{number} is not in the book.",
        "zh": "订单簿中没有 {number}。",
        "ru": "{number} нет в книге заказов.",
    },
    "back": {"en": "Back to the open orders", "zh": "返回在途订单", "ru": "К открытым заказам"},
    "causes_title": {
        "en": "Why buyers cancel",
        "zh": "买家为什么取消",
        "ru": "Почему покупатели отменяют",
    },
    "causes_intro": {
        "en": "{postings} resolved orders seen at {moments} moments; {open} open orders, as of "
        "{as_of} (model {model}).",
        "zh": "{postings} 个已完结订单、{moments} 个观测时点；{open} 个在途订单，截至 {as_of}"
        "（模型 {model}）。",
        "ru": "{postings} завершённых заказов в {moments} моментах; {open} открытых заказов, "
        "на {as_of} (модель {model}).",
    },
    "causes_pending": {
        "en": "The cause analysis is computed after the next sweep of the open orders.",
        "zh": "原因分析将在下一次全量评分后生成。",
        "ru": "Анализ причин появится после следующего пересчёта открытых заказов.",
    },
    "risk_by_cause": {
        "en": "Today's risk by cause: the share of the open orders' total risk that fixing "
        "each cause would remove",
        "zh": "当前风险按原因分布：消除各原因可减少的在途订单总风险比例",
        "ru": "Риск по причинам: доля общего риска открытых заказов, которую убрало бы "
        "устранение причины",
    },
    "rates": {
        "en": "Buyer-cancellation rates",
        "zh": "买家取消率",
        "ru": "Доля отмен покупателями",
    },
    "rates_by": {"en": "By {name}", "zh": "按{name}", "ru": "По признаку: {name}"},
    "orders_n": {"en": "orders", "zh": "单", "ru": "заказов"},
    "dim_carrier": {"en": "carrier", "zh": "承运商", "ru": "перевозчик"},
    "dim_price change since purchase": {
        "en": "price change since purchase",
        "zh": "下单后价格变化",
        "ru": "изменение цены после покупки",
    },
    "dim_lateness": {"en": "lateness", "zh": "延误", "ru": "опоздание"},
    "dim_tracking silence (handed over)": {
        "en": "tracking silence (handed over)",
        "zh": "物流无更新时长（已交付物流）",
        "ru": "тишина трекинга (передан в доставку)",
    },
    "dim_card edits since purchase": {
        "en": "card edits since purchase",
        "zh": "下单后卡片修改",
        "ru": "правки карточки после покупки",
    },
    "dim_region": {"en": "region", "zh": "地区", "ru": "регион"},
    "dim_payment type": {"en": "payment type", "zh": "付款方式", "ru": "способ оплаты"},
    "unknown": {"en": "unknown", "zh": "未知", "ru": "неизвестно"},
}

# The cause report's bucket labels (training.report), in the other languages.
BUCKETS: dict[str, dict[str, str]] = {
    "under 1 day": {"zh": "不到 1 天", "ru": "менее 1 дня"},
    "1–3 days": {"zh": "1–3 天", "ru": "1–3 дня"},
    "3–7 days": {"zh": "3–7 天", "ru": "3–7 дней"},
    "over 7 days": {"zh": "超过 7 天", "ru": "более 7 дней"},
    "cheaper by over 15 %": {"zh": "降价超过 15%", "ru": "дешевле более чем на 15 %"},
    "cheaper by 5–15 %": {"zh": "降价 5–15%", "ru": "дешевле на 5–15 %"},
    "cheaper by 0.5–5 %": {"zh": "降价 0.5–5%", "ru": "дешевле на 0,5–5 %"},
    "unchanged or higher": {"zh": "未变或上涨", "ru": "без изменений или дороже"},
    "no price log": {"zh": "无价格记录", "ru": "нет журнала цен"},
    "late over 3 days": {"zh": "延误超过 3 天", "ru": "опоздание более 3 дней"},
    "late up to 3 days": {"zh": "延误不超过 3 天", "ru": "опоздание до 3 дней"},
    "due within 3 days": {"zh": "3 天内到期", "ru": "срок в ближайшие 3 дня"},
    "over 3 days left": {"zh": "还有 3 天以上", "ru": "осталось более 3 дней"},
    "no promise": {"zh": "无承诺日期", "ru": "нет обещанной даты"},
    "not handed over": {"zh": "尚未交付物流", "ru": "не передан в доставку"},
    "none": {"zh": "无", "ru": "нет"},
    "2 or more": {"zh": "2 次及以上", "ru": "2 и более"},
    "unknown": {"zh": "未知", "ru": "неизвестно"},
}


# Ozon's posting statuses (the Seller API's codes) and push states, for the order page.
STATUSES: dict[str, dict[str, str]] = {
    "awaiting_registration": {
        "en": "awaiting registration",
        "zh": "等待注册",
        "ru": "ожидает регистрации",
    },
    "acceptance_in_progress": {
        "en": "acceptance in progress",
        "zh": "验收中",
        "ru": "идёт приёмка",
    },
    "awaiting_approve": {
        "en": "awaiting approval",
        "zh": "等待确认",
        "ru": "ожидает подтверждения",
    },
    "awaiting_packaging": {"en": "awaiting packaging", "zh": "等待备货", "ru": "ожидает упаковки"},
    "awaiting_deliver": {"en": "awaiting shipment", "zh": "等待发运", "ru": "ожидает отгрузки"},
    "sent_by_seller": {
        "en": "sent by the seller",
        "zh": "卖家已发出",
        "ru": "отправлено продавцом",
    },
    "driver_pickup": {"en": "with the driver", "zh": "司机已取件", "ru": "у водителя"},
    "delivering": {"en": "delivering", "zh": "运输中", "ru": "доставляется"},
    "delivered": {"en": "delivered", "zh": "已送达", "ru": "доставлено"},
    "cancelled": {"en": "cancelled", "zh": "已取消", "ru": "отменено"},
    "not_accepted": {"en": "not accepted", "zh": "未被接收", "ru": "не принят"},
    "arbitration": {"en": "arbitration", "zh": "仲裁中", "ru": "арбитраж"},
    # The states of TYPE_STATE_CHANGED pushes.
    "posting_acceptance_in_progress": {"en": "acceptance", "zh": "验收中", "ru": "приёмка"},
    "posting_transferring_to_delivery": {
        "en": "handed to delivery",
        "zh": "已交付物流",
        "ru": "передан в доставку",
    },
    "posting_in_carriage": {"en": "in carriage", "zh": "运输中", "ru": "в пути"},
    "posting_on_way_to_city": {
        "en": "on the way to the city",
        "zh": "前往目的城市",
        "ru": "едет в город",
    },
    "posting_in_pickup_point": {
        "en": "at the pickup point",
        "zh": "已到自提点",
        "ru": "в пункте выдачи",
    },
    "posting_delivered": {"en": "delivered", "zh": "已送达", "ru": "доставлен"},
    "posting_canceled": {"en": "cancelled", "zh": "已取消", "ru": "отменён"},
}


def status_label(status: str | None, lang: str) -> str:
    """An Ozon posting status in ``lang``, with its code; the code alone when unknown."""
    if not status:
        return "—"
    known = STATUSES.get(status)
    return f"{known[lang]} ({status})" if known else status


def texts(lang: str) -> dict[str, str]:
    """The page's words in ``lang`` (one of :data:`LANGUAGE_NAMES`)."""
    return {key: words[lang] for key, words in _TEXT.items()}


def bucket_label(label: str, lang: str) -> str:
    """A cause-report bucket in ``lang`` (the label itself when no translation is known)."""
    return BUCKETS.get(label, {}).get(lang, label)


def all_keys_complete() -> list[str]:
    """Keys missing a language (empty when every text exists in every language)."""
    return [key for key, words in _TEXT.items() if set(words) != set(LANGUAGE_NAMES)]
