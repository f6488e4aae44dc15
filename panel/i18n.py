"""Panel texts in zh-CN (default) and English.

Each area registers its own catalog: ``i18n.register({"zh-CN": {...}, "en": {...}})``.
``t(key, **fmt)`` translates into the current request's language (``?lang=en`` sets a
cookie; otherwise the cookie, otherwise [company] language).  A key missing in the
chosen language falls back to the other one, then to the key itself, so a forgotten
translation shows up as readable text rather than an error.
"""

from __future__ import annotations

import bottle

LANGUAGES = ("zh-CN", "en")
LANG_COOKIE = "mg_lang"
CATALOG: dict[str, dict[str, str]] = {lang: {} for lang in LANGUAGES}
_default = {"language": "zh-CN"}


def register(catalog: dict[str, dict[str, str]]) -> None:
    """Add an area's texts; a key already defined with a different text is an error."""
    for lang, texts in catalog.items():
        if lang not in CATALOG:
            raise ValueError(f"unknown language {lang!r}")
        for key, text in texts.items():
            old = CATALOG[lang].get(key)
            if old is not None and old != text:
                raise ValueError(f"i18n key {key!r} ({lang}) registered twice with different texts")
            CATALOG[lang][key] = text


def set_default(language: str) -> None:
    _default["language"] = language if language in LANGUAGES else "zh-CN"


def current_language() -> str:
    """The language of the current request (outside a request: the default)."""
    try:
        environ = bottle.request.environ
    except RuntimeError:
        return _default["language"]
    lang = environ.get("mailgate.lang")
    if lang:
        return lang
    lang = bottle.request.query.get("lang") or bottle.request.cookies.get(LANG_COOKIE) or ""
    if lang not in LANGUAGES:
        lang = _default["language"]
    environ["mailgate.lang"] = lang
    return lang


def translate(key: str, language: str, **fmt: object) -> str:
    other = "en" if language == "zh-CN" else "zh-CN"
    text = CATALOG.get(language, {}).get(key) or CATALOG[other].get(key) or key
    if fmt:
        try:
            return text.format(**fmt)
        except (KeyError, IndexError, ValueError):
            return text
    return text


def t(key: str, **fmt: object) -> str:
    return translate(key, current_language(), **fmt)


register({
    "zh-CN": {
        "app.title": "Mailgate 管理面板",
        "nav.home": "首页",
        "nav.logout": "退出登录",
        "nav.language": "English",
        "nav.menu": "菜单",
        "login.title": "登录",
        "login.login": "邮箱或账号",
        "login.password": "密码",
        "login.submit": "登录",
        "login.hint": "员工请用企业邮箱和邮箱密码登录；管理员和审计员用本地账号。",
        "login.failed": "账号或密码错误。",
        "login.locked": "登录失败次数过多，请 {seconds} 秒后再试。",
        "login.upstream": "暂时无法连接邮件服务器验证密码，请稍后再试。",
        "login.no_access": "该账号没有管理面板的权限。",
        "login.expired": "会话已过期，请重新登录。",
        "login.logged_out": "您已退出登录。",
        "home.title": "首页",
        "home.welcome": "欢迎，{name}",
        "home.roles": "角色：{roles}",
        "error.403": "没有权限",
        "error.403.text": "您的角色无权访问此页面或执行此操作。",
        "error.404": "页面不存在",
        "error.404.text": "找不到您要访问的页面。",
        "error.405": "不允许的请求方法",
        "error.400": "请求无效",
        "error.409": "无法按要求完成",
        "error.500": "服务器内部错误",
        "error.500.text": "处理请求时出错，已记录日志。请稍后再试。",
        "error.csrf": "安全校验失败（CSRF 令牌缺失或不匹配）。请刷新页面后重试。",
        "error.back": "返回首页",
        "role.salesperson": "业务员",
        "role.dept_head": "部门经理",
        "role.crm_admin": "CRM 管理员",
        "role.auditor": "审计员",
        "role.it_admin": "IT 管理员",
        "common.save": "保存",
        "common.cancel": "取消",
        "common.search": "搜索",
        "common.edit": "编辑",
        "common.delete": "删除",
        "common.add": "添加",
        "common.yes": "是",
        "common.no": "否",
        "common.none": "无",
        "common.actions": "操作",
        "common.prev": "上一页",
        "common.next": "下一页",
        "common.page": "第 {page} / {pages} 页，共 {total} 条",
        "common.saved": "已保存。",
        "common.readonly": "只读",
    },
    "en": {
        "app.title": "Mailgate panel",
        "nav.home": "Home",
        "nav.logout": "Sign out",
        "nav.language": "中文",
        "nav.menu": "Menu",
        "login.title": "Sign in",
        "login.login": "E-mail or account",
        "login.password": "Password",
        "login.submit": "Sign in",
        "login.hint": "Employees: your company e-mail and mail password. Administrators and auditors: "
                      "your local account.",
        "login.failed": "Wrong login or password.",
        "login.locked": "Too many failed sign-ins; try again in {seconds} seconds.",
        "login.upstream": "The mail server cannot check your password right now; try again later.",
        "login.no_access": "This account has no access to the panel.",
        "login.expired": "Your session expired; please sign in again.",
        "login.logged_out": "You are signed out.",
        "home.title": "Home",
        "home.welcome": "Welcome, {name}",
        "home.roles": "Roles: {roles}",
        "error.403": "Forbidden",
        "error.403.text": "Your role may not open this page or do this.",
        "error.404": "Not found",
        "error.404.text": "The page you asked for does not exist.",
        "error.405": "Method not allowed",
        "error.400": "Bad request",
        "error.409": "Cannot be done as asked",
        "error.500": "Internal error",
        "error.500.text": "Something went wrong; it has been logged. Please try again later.",
        "error.csrf": "Security check failed (CSRF token missing or wrong). Reload the page and try again.",
        "error.back": "Back to the start page",
        "role.salesperson": "Salesperson",
        "role.dept_head": "Department head",
        "role.crm_admin": "CRM administrator",
        "role.auditor": "Auditor",
        "role.it_admin": "IT administrator",
        "common.save": "Save",
        "common.cancel": "Cancel",
        "common.search": "Search",
        "common.edit": "Edit",
        "common.delete": "Delete",
        "common.add": "Add",
        "common.yes": "Yes",
        "common.no": "No",
        "common.none": "None",
        "common.actions": "Actions",
        "common.prev": "Previous",
        "common.next": "Next",
        "common.page": "Page {page} of {pages}, {total} in all",
        "common.saved": "Saved.",
        "common.readonly": "Read-only",
    },
})
