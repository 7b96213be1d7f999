// Line charts on a canvas: time along the bottom, one line per series, gaps where a value is missing.

const PAD = { left: 56, right: 8, top: 22, bottom: 18 };

// chart: { times: [unix s], window: seconds shown, until: unix s, series: [{ label, color, values }],
//          format: value => text, min?: number, max?: number }
export function drawChart(canvas, chart) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 320;
  const height = canvas.clientHeight || 120;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  const text = style.color || "#fff";
  ctx.font = "12px system-ui, sans-serif";

  const from = chart.until - chart.window;
  const values = chart.series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const top = chart.max ?? Math.max(niceCeiling(Math.max(...values, 0)), chart.min ?? 0, 1e-9);
  const bottom = chart.min ?? 0;
  const x = (t) => PAD.left + ((t - from) / chart.window) * (width - PAD.left - PAD.right);
  const y = (v) => height - PAD.bottom - ((v - bottom) / (top - bottom || 1)) * (height - PAD.top - PAD.bottom);

  ctx.strokeStyle = "rgba(200, 210, 220, 0.25)";
  ctx.fillStyle = text;
  ctx.lineWidth = 1;
  for (const v of [bottom, (bottom + top) / 2, top]) {
    ctx.beginPath();
    ctx.moveTo(PAD.left, y(v));
    ctx.lineTo(width - PAD.right, y(v));
    ctx.stroke();
    ctx.fillText(chart.format(v), 2, y(v) + 4);
  }
  const minutes = Math.round(chart.window / 60);
  ctx.fillText(`−${minutes} min`, PAD.left, height - 4);
  ctx.fillText("0", width - PAD.right - 8, height - 4);

  let legend = PAD.left;
  for (const series of chart.series) {
    ctx.strokeStyle = series.color;
    ctx.fillStyle = series.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    series.values.forEach((v, i) => {
      const t = chart.times[i];
      if (v === null || v === undefined || t < from) { drawing = false; return; }
      if (drawing) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      drawing = true;
    });
    ctx.stroke();
    ctx.fillText(series.label, legend, 14);
    legend += ctx.measureText(series.label).width + 16;
  }
}

function niceCeiling(value) {
  if (value <= 0) return 0;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * step) return m * step;
  return 10 * step;
}
