/* Applies the console's theme before the first paint (the login page and the app): the choice
 * remembered by the toggle, else the system's colour scheme. */
(function () {
  var t = '';
  try { t = localStorage.getItem('llm-broker.console.theme') || ''; } catch (e) { t = ''; }
  if (t !== 'dark' && t !== 'light') {
    t = window.matchMedia && window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
  }
  document.documentElement.dataset.theme = t;
})();
